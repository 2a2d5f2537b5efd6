"""The text -> vector model as one folder, ready for a tracker to upload and register.

    package_text_model(params, model_dir, dest) -> TextModelPackage | None
    with staged_text_model(params, model_dir) as package: ...   # the same, in a temporary folder

A package holds everything the registered model needs at load time, and nothing about the
tracker that uploads it::

    dest/model/best.pt         the checkpoint (copied)
    dest/model/config.json     what rebuilds the network
    dest/tokenizer.json        the model's own tokenizer
    dest/text_model.json       {"lowercase", "latent_dim", "tokenizer_hash", "batch_tokens"}

Only a model with a latent (``kind: vae``) makes a package; the LM baseline has no vector to
return. ``TextModelPackage.read(folder)`` reads a package back (what a tracker does).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from vaepipe.core.config import Params
from vaepipe.core.errors import InputError
from vaepipe.core.io import write_json
from vaepipe.ml import checkpoint
from vaepipe.ml.model import VAEConfig

log = logging.getLogger(__name__)

MODEL_DIR = "model"
TOKENIZER_FILE = "tokenizer.json"
PACKAGE_FILE = "text_model.json"
# tokens per encoding batch when the registered model predicts (its long-standing default)
BATCH_TOKENS = 32768


@dataclass(frozen=True)
class TextModelPackage:
    """A packaged text -> vector model: its folder and the settings its predictions depend on."""

    root: Path
    lowercase: bool  # the corpus's ingest.lowercase: queries are normalised the same way
    latent_dim: int  # width of each output row
    tokenizer_hash: str | None  # sha256 of tokenizer.json, as recorded in config.json
    batch_tokens: int = BATCH_TOKENS

    @property
    def model_dir(self) -> Path:
        """Folder with best.pt and config.json."""
        return self.root / MODEL_DIR

    @property
    def tokenizer_file(self) -> Path:
        return self.root / TOKENIZER_FILE

    def settings(self) -> dict[str, object]:
        """The contents of text_model.json."""
        out = asdict(self)
        del out["root"]
        return out

    @classmethod
    def read(cls, root: str | Path) -> TextModelPackage:
        """The package in ``root``; InputError when a file is missing or text_model.json is bad."""
        root = Path(root)
        path = root / PACKAGE_FILE
        for needed in (path, root / MODEL_DIR / checkpoint.BEST, root / MODEL_DIR / checkpoint.CONFIG_FILE,
                       root / TOKENIZER_FILE):
            if not needed.is_file():
                raise InputError(f"{needed}: not found (not a text model package)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(root=root, lowercase=bool(data["lowercase"]), latent_dim=int(data["latent_dim"]),
                       tokenizer_hash=data.get("tokenizer_hash"),
                       batch_tokens=int(data.get("batch_tokens", BATCH_TOKENS)))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
            raise InputError(f"{path}: not a text model description ({type(e).__name__}: {e})") from None


def package_text_model(params: Params, model_dir: str | Path, dest: str | Path) -> TextModelPackage | None:
    """Copy the trained model in ``model_dir`` and ``paths.tokenizer``'s tokenizer into ``dest``.

    None (and nothing written) for a model without a latent, or when there is no tokenizer.json
    to package. InputError when ``model_dir`` holds no readable config.json.
    """
    model_dir, dest = Path(model_dir), Path(dest)
    config = checkpoint.read_config(model_dir)
    cfg = VAEConfig.from_dict(config["model"])
    if not cfg.has_latent:
        log.info("%s: kind %r has no latent; no text model packaged", model_dir, cfg.kind)
        return None
    tokenizer = Path(params.paths.tokenizer) / TOKENIZER_FILE
    if not tokenizer.is_file():
        log.warning("%s not found; no text model packaged", tokenizer)
        return None
    package = TextModelPackage(root=dest, lowercase=params.ingest.lowercase, latent_dim=cfg.latent_dim,
                               tokenizer_hash=config.get("tokenizer_hash"))
    package.model_dir.mkdir(parents=True, exist_ok=True)
    for name in (checkpoint.BEST, checkpoint.CONFIG_FILE):
        shutil.copy2(model_dir / name, package.model_dir / name)
    shutil.copy2(tokenizer, package.tokenizer_file)
    write_json(dest / PACKAGE_FILE, package.settings())
    return package


@contextlib.contextmanager
def staged_text_model(params: Params, model_dir: str | Path) -> Iterator[TextModelPackage | None]:
    """``package_text_model`` into a temporary folder, removed on exit.

    A copy that fails (a full temporary disk) is warned about and gives None: the package only
    feeds the tracker, and tracking never fails a finished training.
    """
    with tempfile.TemporaryDirectory(prefix="vaepipe-text-model-") as tmp:
        try:
            package = package_text_model(params, model_dir, tmp)
        except OSError as e:
            log.warning("could not package the text model from %s in %s: %s", model_dir, tmp, e)
            package = None
        yield package
