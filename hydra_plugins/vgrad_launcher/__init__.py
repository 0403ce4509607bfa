"""vgrad's Hydra launcher: a sweep's jobs grouped by structure, each group one program."""
