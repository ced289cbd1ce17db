"""The pipeline's stage scripts: `python -m stages.NAME`, one per DVC stage in dvc.yaml."""
