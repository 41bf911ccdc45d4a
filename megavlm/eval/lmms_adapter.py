"""megavlm as an lmms-eval model: ``lmms-eval --model megavlm --model_args checkpoint=DIR``.

lmms-eval hands a model PIL images (``doc_to_visual``) with a text context. This adapter
**encodes the PIL images itself with the checkpoint's recorded encoder** (megavlm.eval.images:
``model.vision.encoder`` of the run config, at the training store's image size), through the
data pipeline's own decode + encode path (megavlm.encoders: the PIL image is serialized
losslessly and decoded exactly as the training images were, bicubic to the encoder's size). It
does not read precomputed embeddings. An encoder whose output does not match the checkpoint's
projector (patches x width), or a ``model_args`` ``encoder=`` that is not the recorded one, is
refused with the checkpoint named.

Requests map onto megavlm.eval.runner.CheckpointModel exactly as the vision tasks do: the image
first (one image per request; more is refused), then the instruction layout ``[USER] \\n{context}
[SEP][ASSISTANT]``. ``loglikelihood`` returns (sum of log P(continuation tokens), greedy?);
``generate_until`` decodes greedily (sampling arguments are ignored: evaluation is greedy) up to
``max_new_tokens`` (default 128) and stops at SEP/EOD or any ``until`` string. Requests without
an image are text rows in the same layout.

Registration: the ``lmms_eval.models`` entry point of the megavlm package (setup.py) makes the
name known to the lmms-eval command line; :func:`register` does the same in-process (for
``lmms_eval.evaluator.simple_evaluate(model="megavlm", …)`` from an uninstalled checkout).
Install: ``pip install -e '.[lmms]'`` — see setup.py for the ``--no-deps`` recipe that keeps
torch as it is.
"""

from __future__ import annotations

import io
from typing import Any, Optional, Sequence

import numpy as np
import torch

try:
    from lmms_eval.api.instance import GenerationResult, Instance
    from lmms_eval.api.model import lmms
except ImportError as e:  # pragma: no cover - exercised where lmms-eval is absent
    raise ImportError("megavlm's lmms-eval model needs lmms-eval: pip install --no-deps lmms-eval==0.7.3 "
                      "loguru accelerate jsonlines tenacity (see setup.py, extra 'lmms')") from e

from megavlm.data.indexed import DataError
from megavlm.encoders import decode_pil, mean_fill
from megavlm.eval.images import load_encoder, recorded_encoder
from megavlm.eval.runner import CheckpointModel, EvalError, ScoreRequest
from megavlm.eval.vision import prompt_ids

NAME = "megavlm"
CLASS_PATH = "megavlm.eval.lmms_adapter.MegavlmLMMS"
CONTEXT = "\n{question}"


class LoglikelihoodPair(tuple, GenerationResult):
    """``(logprob, is_greedy)`` as the ``lmms`` interface returns it, that is also a
    GenerationResult whose ``text`` is the pair: lmms-eval 0.7.3's evaluator passes each response
    through ``unwrap_generation_output``, which turns anything but a str or a GenerationResult
    into its ``str()`` — a loglikelihood pair would reach ``multiple_choice`` scoring as the text
    ``"(-3.2, False)"``. A GenerationResult's text is passed on as it is."""

    def __new__(cls, logprob: float, greedy: bool):
        return tuple.__new__(cls, (float(logprob), bool(greedy)))

    def __init__(self, logprob: float, greedy: bool):  # tuple holds the values; nothing to set
        pass

    @property
    def text(self):
        return (self[0], self[1])

    token_counts = None


def manifest():
    """The lmms-eval model manifest of ``megavlm`` (the entry point's payload)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=NAME, simple_class_path=CLASS_PATH)


def register() -> None:
    """Make ``--model megavlm`` known to lmms-eval in this process."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)


class MegavlmLMMS(lmms):
    """A megavlm checkpoint behind lmms-eval's ``lmms`` interface (simple, not chat)."""

    is_simple = True

    def __init__(self, checkpoint: Optional[str] = None, batch_size: int | str = 16, max_new_tokens: int = 128,
                 encoder: Optional[str] = None, model: Optional[CheckpointModel] = None, **_ignored: Any):
        super().__init__()
        if model is None:
            if not checkpoint:
                raise EvalError("lmms-eval model megavlm needs model_args checkpoint=<checkpoint dir>")
            bs = str(batch_size)
            model = CheckpointModel.load(checkpoint, batch_size=16 if bs.startswith("auto") else int(bs))
        self.model = model
        spec, _ = recorded_encoder(model)
        if encoder is not None and encoder != spec:
            raise EvalError(f"model_args encoder={encoder!r}, but checkpoint {model.path} was trained on "
                            f"{spec!r} embeddings")
        self.encoder = load_encoder(model)
        self.max_new_tokens = int(max_new_tokens)

    @property
    def batch_size(self) -> int:
        return self.model.batch_size

    # -- images -------------------------------------------------------------------------------

    def _pixels(self, image, where: str) -> np.ndarray:
        """A PIL image (or an image file path) -> [size, size, 3] uint8, decoded and resized as training's were."""
        if isinstance(image, str):
            with open(image, "rb") as f:
                data = f.read()
        elif hasattr(image, "save"):
            buf = io.BytesIO()
            image.save(buf, format="PNG")  # lossless: decode_pil sees exactly these pixels
            data = buf.getvalue()
        else:
            raise EvalError(f"{where}: lmms-eval gave a visual of type {type(image).__name__}; megavlm "
                            f"takes one PIL image (or image path) per request (no video or audio)")
        try:
            # resized as the checkpoint's training stores were (letterbox or square, megavlm.eval.images)
            return decode_pil(data, self.encoder.image_size, where, self.encoder.resize, mean_fill(self.encoder.mean))
        except DataError as e:
            raise EvalError(str(e)) from None

    def _embed(self, visuals: Sequence[list], where: Sequence[str]) -> list[Optional[torch.Tensor]]:
        """Per request, its image's patch embeddings [P, D] (None for a text-only request)."""
        out: list[Optional[torch.Tensor]] = [None] * len(visuals)
        todo = []
        for k, (vis, w) in enumerate(zip(visuals, where)):
            vis = [v for v in (vis or []) if v is not None]
            if len(vis) > 1:
                raise EvalError(f"{w}: {len(vis)} images in one request; a megavlm model reads one image")
            if vis:
                todo.append((k, self._pixels(vis[0], w)))
        for lo in range(0, len(todo), 32):
            chunk = todo[lo:lo + 32]
            emb = self.encoder(np.stack([px for _, px in chunk]))
            for (k, _), e in zip(chunk, emb):
                out[k] = e
        return out

    def _visuals(self, req: Instance, doc_to_visual, doc_id, task, split) -> list:
        if doc_to_visual is None:
            return []
        if isinstance(doc_to_visual, (list, tuple)):
            doc_to_visual = doc_to_visual[0]
        vis = doc_to_visual(self.task_dict[task][split][doc_id])
        return list(vis) if isinstance(vis, (list, tuple)) else [vis]

    def _context(self, text: str) -> list[int]:
        return prompt_ids(self.model, text, CONTEXT)

    # -- the lmms interface -------------------------------------------------------------------

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        conts, visuals, where = [], [], []
        for req in requests:
            context, target, doc_to_visual, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            cont = target if isinstance(target, str) else target(doc)
            if isinstance(cont, list):
                cont = cont[0]
            conts.append((context, str(cont)))
            visuals.append(self._visuals(req, doc_to_visual, doc_id, task, split))
            where.append(f"lmms-eval task {task} doc {doc_id}")
        images = self._embed(visuals, where)
        scores = self.model.score([ScoreRequest(self._context(ctx), self.model.encode(cont), im)
                                   for (ctx, cont), im in zip(conts, images)])
        return [LoglikelihoodPair(s.logprob, s.greedy) for s in scores]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        groups: dict[tuple, list[int]] = {}
        prompts, visuals, where = [], [], []
        for k, req in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args[:6]
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n = int(gen_kwargs.get("max_new_tokens", self.max_new_tokens))
            groups.setdefault((n, tuple(until)), []).append(k)
            prompts.append(self._context(context))
            visuals.append(self._visuals(req, doc_to_visual, doc_id, task, split))
            where.append(f"lmms-eval task {task} doc {doc_id}")
        images = self._embed(visuals, where)
        out = [""] * len(requests)
        sp = self.model.tok
        for (n, until), idx in groups.items():
            texts = self.model.generate([prompts[i] for i in idx], [images[i] for i in idx], max_new_tokens=n,
                                        stop_ids=(sp.sep, sp.eod), stop_strings=until)
            for i, t in zip(idx, texts):
                out[i] = t.strip()
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise EvalError("lmms-eval model megavlm does not run multi-round generation tasks")
