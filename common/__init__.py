"""What every Lightyard pipeline shares: config, command line, MLflow logging, callbacks."""
