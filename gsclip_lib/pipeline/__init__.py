"""What every stage's run shares: the runner that frames a stage's work (parameters, outputs,
metrics) and the code-dependency helpers behind ``dvc.yaml`` and the resume fingerprints."""
