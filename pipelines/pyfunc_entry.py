"""What MLflow runs to build a registered model (models from code): the model is made here, never unpickled."""

from mlflow.models import set_model

from pipelines.pyfunc_model import InspectorModel

set_model(InspectorModel())
