"""Training side of DiScene: Occ-ScanNet data, synthetic scenes, losses, distillation, metrics, renders."""
