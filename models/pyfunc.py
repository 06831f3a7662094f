"""The chosen model as an MLflow model: logged, registered, served over REST, loaded anywhere.

A pyfunc around what `ensemble.load` returns (a vote over member checkpoints, or one network),
packaged with its checkpoints and this project's code, so a registered version needs nothing
from the experiment folder.

Input: a DataFrame with one column `image` holding each image file's bytes (PNG, JPEG, ... as
read from disk); over REST the bytes are base64 strings:

    curl -X POST http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
      -d '{"dataframe_split": {"columns": ["image"], "data": [["'$(base64 -w0 cat.jpg)'"]]}}'

Images are decoded exactly as training images were (shorter side resized, centre crop, RGB).
Output: one row per image: `prediction` (the class name) and `prob_<class>` for every class,
the columns of the --predict CSV.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd

IMAGE_COLUMN = "image"
PACKAGES = ("mlflow", "torch", "torchvision", "timm", "numpy", "pandas", "pillow", "cloudpickle")
CODE = ("models", "trainables")  # this project's packages the model imports


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """`ensemble.load` behind MLflow's pyfunc interface: image bytes in, class probabilities
    and the predicted label out."""

    def load_context(self, context) -> None:
        from models.predict import load

        self.model = load(Path(context.artifacts["model"]) / "ensemble.pt")  # on a GPU if any

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None
                ) -> pd.DataFrame:
        images = decode_column(model_input, self.model.image_size)
        return prediction_table(self.model.predict_proba(images), self.model.class_names)


def decode_column(frame: pd.DataFrame, size: int) -> np.ndarray:
    """The `image` column's file bytes decoded to uint8 (N, size, size, 3) as training decodes
    files; a bad row is an INVALID_PARAMETER_VALUE error (HTTP 400) naming it and the fix."""
    from trainables.data import decode_image

    if IMAGE_COLUMN not in frame.columns:
        raise _bad_input(f"the input has no column {IMAGE_COLUMN!r} (it has "
                         f"{', '.join(map(str, frame.columns)) or 'none'}); send one column "
                         f"{IMAGE_COLUMN!r} of image file bytes, base64-encoded over REST")
    out = np.empty((len(frame), size, size, 3), np.uint8)
    for i, value in enumerate(frame[IMAGE_COLUMN]):
        image = decode_image(io.BytesIO(value), size) if isinstance(value, bytes) else None
        if image is None or isinstance(image, str):
            raise _bad_input(f"row {i} of column {IMAGE_COLUMN!r} does not decode as an image; "
                             "send the bytes of an image file (PNG, JPEG, ...), base64-encoded "
                             "over REST")
        out[i] = image
    return out


def prediction_table(probs: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    from models.predict import predictions_frame

    return predictions_frame([""] * len(probs), probs, class_names).drop(columns="image")


def _bad_input(message: str):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def png_bytes(images: np.ndarray) -> list[bytes]:
    """uint8 NHWC arrays as PNG files' bytes (the input example)."""
    from PIL import Image

    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


# ---------------------------------------------------------------------------- logging


def package(saved: Path, out: Path) -> Path:
    """A self-contained copy of a saved model in `out`: ensemble.pt and, for a vote, its
    member checkpoints under members/ (referenced relative to it, as `ensemble.load` reads)."""
    from models.artifact import Vote, read
    from trainables.checkpoint import Checkpoint

    model = read(saved)
    if isinstance(model, Vote):  # its members travel with it, without their val predictions
        names = [out / "members" / f"{i}.pt" for i in range(len(model.members))]
        for member, name in zip(model.members, names):
            Checkpoint.load(member).slim().save(name)
        Vote([str(n) for n in names], model.weights, model.hard, model.tta).save(
            out / "ensemble.pt")
    else:
        model.slim().save(out / "ensemble.pt")
    return out


def requirements() -> list[str]:
    """The packages prediction imports, pinned to the versions that trained the model."""
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in PACKAGES]


def register(saved: str | Path, *, name: str, uri: str, run_id: str, examples: np.ndarray,
             description: str) -> int:
    """Logs the model saved at `saved` (ensemble.pt or a training checkpoint) as a pyfunc in
    the run `run_id` and registers it as a new version of `name`; returns the version."""
    import mlflow
    from mlflow.models import infer_signature

    from models.predict import load

    root = Path(__file__).resolve().parents[1]
    mlflow.set_tracking_uri(uri)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # the class is pickled by reference to this module, which travels in code_paths
    logging.getLogger("mlflow.pyfunc").addFilter(
        lambda record: "Passing a Python object" not in record.getMessage())
    with tempfile.TemporaryDirectory() as tmp:
        folder = package(Path(saved), Path(tmp) / "model")
        model = load(folder / "ensemble.pt")
        example = pd.DataFrame({IMAGE_COLUMN: png_bytes(examples)})
        output = prediction_table(model.predict_proba(examples), model.class_names)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=ImageClassifier(), artifacts={"model": str(folder)},
                code_paths=[str(root / c) for c in CODE], pip_requirements=requirements(),
                signature=infer_signature(example, output), input_example=example,
                registered_model_name=name)
    version = int(info.registered_model_version)
    client = mlflow.MlflowClient(uri)
    client.update_model_version(name, str(version), description)
    if not client.get_registered_model(name).description:  # a user's own text stays
        client.update_registered_model(name, f"imgsearch image classifier.\n\n{USAGE}")
    return version


def describe(kind: str, experiment: str, class_names: list[str], test: dict) -> str:
    """The registered version's description (Markdown in the UI): what it is, how to call it."""
    return (f"{kind} of imgsearch experiment `{experiment}`: {len(class_names)} classes, test "
            f"accuracy {test.get('accuracy', float('nan')):.4f}.\n\n" + USAGE)


USAGE = ("Input: a DataFrame with one column `image` holding image file bytes (PNG, JPEG, ...), "
         "base64 strings over REST: `{\"dataframe_split\": {\"columns\": [\"image\"], \"data\": "
         "[[\"BASE64\"]]}}`. Images are decoded as in training (shorter side resized, centre "
         "crop). Output per image: `prediction` (the class name) and `prob_CLASS` per class.")
