"""Data formats and simulated acquisitions: DeepFluoro-layout files, simulator, stress simulator."""
