"""The patient-specific coarse network: architecture, losses, training, inference."""
