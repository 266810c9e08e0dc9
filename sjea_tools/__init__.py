"""sjea-tools: Stacked Joint Embedding Architectures: train, export, embed and search.

    import sjea_tools
    model = sjea_tools.load_model("runs/tiny")          # eval mode
    ys = model.forward_levels(batch)                      # Y[0..N-1] in one pass
    x = model.preprocess(pil_image)                       # the exact input tensor
"""

__version__ = "0.1.0"

from .config import PRESETS, RunConfig, resolve_config  # noqa: E402
from .errors import SjeaError  # noqa: E402
from .losses import stacked_vicreg_loss, vicreg_loss  # noqa: E402
from .models import StackedModel, build_model  # noqa: E402
from .runs import find_run, load_model, model_id  # noqa: E402

__all__ = ["PRESETS", "RunConfig", "SjeaError", "StackedModel", "__version__", "build_model", "find_run",
           "load_model", "model_id", "resolve_config", "stacked_vicreg_loss", "vicreg_loss"]
