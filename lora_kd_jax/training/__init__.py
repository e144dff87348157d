"""Training: the train-state recipe and optimizer, the jitted steps, the epoch loop, many seeds, devices and hosts."""
