"""Simulated acquisitions of the shipped CT for the ROS tests, built from the node's own
parameter files so the shipped configs are what gets exercised."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import numpy as np
import torch
import yaml

from mvreg_ros.core.data import simulate
from mvreg_ros.core.geometry import carm
from mvreg_ros.core.geometry.transforms import invert, perturb, transform_points
from mvreg_ros.core.imaging.volume import load_example_ct
from mvreg_ros.core.rendering.renderer import Renderer
from mvreg_ros.ros.params import NodeConfig, build_config

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "config"
NODE_KEY = "register_node"
# a quick refinement budget and the tiny CT: each registration takes about a second
QUICK = {
    "volume_path": "example:8",
    "refine_sizes": [32],
    "refine_iterations": [100],
    "refine_samples": [48],
    "refine_patches": [8],
    # the tiny CT's 20 mm slices make its DRRs' edges steps: with the engine's gradient weight (0.75) the
    # sequential mode's per-view check took the pre-motion views for moved anatomy (docs/acceptance.md)
    "refine_grad_weight": 0.5,
    "device": "cpu",
    # the warm-up hints (warmup_image_size, warmup_focal_px) come from config/biplane.yaml and
    # config/mobile_carm.yaml, which are set to this simulated detector (DETECTOR below)
}
DETECTOR = simulate.DetectorConfig(height=64, width=64, pixel_mm=1.164 * 4)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def read_params(path: Path) -> dict:
    """The flattened ``register_node: ros__parameters:`` section of a params file."""
    doc = yaml.safe_load(Path(path).read_text())
    return flatten(doc[NODE_KEY]["ros__parameters"])


def write_params(path: Path, values: dict) -> Path:
    nested: dict = {}
    for key, v in values.items():
        node = nested
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    path.write_text(yaml.safe_dump({NODE_KEY: {"ros__parameters": nested}}, sort_keys=False))
    return path


def T_param(T_mm: torch.Tensor) -> list[float]:
    """initial_T_ref_from_ct parameter value: 16 row-major values, translation in metres."""
    T = T_mm.to(torch.float64).clone()
    T[:3, 3] /= 1000.0
    return [float(v) for v in T.reshape(-1)]


def T_from_tf_json(tf: dict) -> torch.Tensor:
    """A received TF line (metres, quaternion) as a 4x4 in mm, with scipy (independent of mvreg_ros)."""
    from scipy.spatial.transform import Rotation

    T = torch.eye(4, dtype=torch.float64)
    T[:3, :3] = torch.tensor(Rotation.from_quat(tf["q"]).as_matrix())
    T[:3, 3] = torch.tensor(tf["t"], dtype=torch.float64) * 1000.0
    return T


@functools.lru_cache(maxsize=1)
def volume():
    return load_example_ct(downsample=8)


@functools.lru_cache(maxsize=1)
def renderer():
    return Renderer(volume())


def landmarks_ct() -> torch.Tensor:
    c = volume().bone_centre_ct().to(torch.float64)
    axes = torch.cat([torch.eye(3), -torch.eye(3), torch.zeros(1, 3)]).to(torch.float64)
    return c + 50.0 * axes


def mtre_mm(T_est: torch.Tensor, T_true: torch.Tensor) -> float:
    p = landmarks_ct()
    return float((transform_points(T_est, p) - transform_points(T_true, p)).norm(dim=-1).mean())


@dataclasses.dataclass
class Scenario:
    cfg: NodeConfig
    truth: torch.Tensor  # T_ref_from_ct, mm
    initial: torch.Tensor
    K: torch.Tensor
    overrides: dict

    def joints_vector(self, joints: dict) -> list[float]:
        return [float(joints[n]) for n in self.cfg.joint_names]

    def image(self, topic: int, joints: dict, seed: int = 0) -> np.ndarray:
        """A raw 16-bit image of topic ``topic``'s plane at ``joints``, of the CT at the truth."""
        T_ref_from_cam = self.cfg.planes[topic].T_ref_from_cam(joints)
        T_cam_from_ct = invert(T_ref_from_cam) @ self.truth
        raw = simulate.acquire(
            renderer(),
            T_cam_from_ct[None],
            self.K[None],
            DETECTOR.height,
            DETECTOR.width,
            generator=torch.Generator().manual_seed(seed),
        )
        return raw[0].numpy().astype(np.uint16)


def make_scenario(config_name: str, *, seed: int = 3, extra: dict | None = None) -> Scenario:
    """The node's config from ``config/<config_name>`` + the quick test overrides, a truth pose
    (supine near the first plane's isocentre, slightly turned) and a start pose 3 deg / 5 mm off."""
    values = read_params(CONFIG / config_name)
    values.update(QUICK)
    cfg = build_config(values, resolve=False)
    centre = volume().bone_centre_ct().to(torch.float64)
    g = torch.Generator().manual_seed(seed)
    supine = cfg.planes[0].T_ref_from_iso @ carm.T_iso_from_ct_supine(centre, torch.tensor([6.0, -4.0, 5.0]))
    truth = perturb(supine, rot_deg=4.0, trans_mm=0.0, centre_ct=centre, generator=g)
    initial = perturb(truth, rot_deg=3.0, trans_mm=5.0, centre_ct=centre, generator=g)
    overrides = dict(QUICK, initial_T_ref_from_ct=T_param(initial), **(extra or {}))
    return Scenario(cfg=cfg, truth=truth, initial=initial, K=DETECTOR.K(), overrides=overrides)


def write_publisher_inputs(
    scenario: Scenario, directory: Path, shots: list[dict], *, rounds: int, stamp_offsets_s: dict | None = None
) -> tuple[Path, Path]:
    """Spec and images for helpers/sim_carm_publisher.py. ``shots``: [{"joints": {...}, "topics": [i, ...]}]."""
    arrays, spec_shots = {}, []
    for k, shot in enumerate(shots):
        images = {}
        for i in shot["topics"]:
            key = f"shot{k}_topic{i}"
            arrays[key] = scenario.image(i, shot["joints"], seed=k * 10 + i)
            images[str(i)] = key
        spec_shots.append({"joints": scenario.joints_vector(shot["joints"]), "images": images})
    cfg = scenario.cfg
    K = [float(v) for v in scenario.K.reshape(-1)]
    spec = {
        "image_topics": list(cfg.image_topics),
        "camera_info_topics": list(cfg.camera_info_topics),
        "joint_states_topic": cfg.joint_states_topic,
        "joint_names": list(cfg.joint_names),
        "K": {str(i): K for i in range(len(cfg.image_topics))},
        "rate_hz": 50.0,
        "move_s": 0.3,
        "hold_s": 0.3,
        "image_delay_s": 0.1,
        "rounds": rounds,
        "stamp_offsets_s": stamp_offsets_s or {},
        "shots": spec_shots,
        "tail_s": 1.0,
    }
    spec_path = directory / "publisher_spec.json"
    spec_path.write_text(json.dumps(spec))
    data_path = directory / "publisher_images.npz"
    np.savez(data_path, **arrays)
    return spec_path, data_path
