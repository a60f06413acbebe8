"""Training-state capture: TrainState, data position, seeding, ZeRO optimizer state."""
