"""Where trials live: the local run folder, or an optuna RDB storage (one process or a shared study)."""
