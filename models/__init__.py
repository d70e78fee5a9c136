"""Plain torch library: backbones, the Siamese embedder, losses, datasets, training and ONNX export.

No prefect, no mlflow."""
