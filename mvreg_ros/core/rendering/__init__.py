"""The differentiable X-ray renderer and its backends (gather, native C++, reference)."""
