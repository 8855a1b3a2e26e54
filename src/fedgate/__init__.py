"""fedgate: federated learning for medical imaging that a hospital can verify."""

__version__ = "0.1.0"
