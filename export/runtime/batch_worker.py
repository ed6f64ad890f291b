"""What runs on the Ray workers: decoding (CPU tasks) and captioning (an actor per model copy). No Ray import here.

``decode_batch`` turns the bytes Ray's binary reader read into the model's input with core.images' loader (the
caption command's: same formats, pixel limit and reduced-scale JPEG decoding), a file that is not a usable image
becoming a row with its error. ``CaptionActor`` loads one Captioner when Ray starts it (through
export.runtime.load.load_captioner, the caption command's flags, the manifest's sha256 pinned) and captions the
batches it is given.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import numpy as np

from core.images import ImageLoadError, load_image_bytes
from export.manifest import transform_for


def decode_batch(batch: dict[str, np.ndarray], preprocess: dict[str, Any]) -> dict[str, np.ndarray]:
    """{"bytes", "path"} -> {"path", "image" [N,3,S,S] float32, "error" ("" when the image is good)}."""
    transform = transform_for(preprocess)
    size = int(preprocess["image_size"])
    images = np.zeros((len(batch["path"]), 3, size, size), np.float32)  # [N,3,S,S]; zeros where the file failed
    errors = []
    for i, (data, path) in enumerate(zip(batch["bytes"], batch["path"])):
        try:
            images[i] = transform(load_image_bytes(bytes(data), str(path), reduce_for=size)).numpy()
            errors.append("")
        except ImageLoadError as e:
            errors.append(str(e))
    return {"path": batch["path"], "image": images, "error": np.array(errors, dtype=object)}


class CaptionActor:
    """One Captioner per actor, loaded once. ``model`` None: the export is the actor's working directory (shipped
    by Ray's runtime_env). The manifest's sha256 is checked here, on every worker, before the model loads."""

    def __init__(self, args: argparse.Namespace, model: str | None, sha256: str):
        import ray

        from export.runtime.load import load_captioner

        args = argparse.Namespace(**vars(args))
        args.model, args.expect_sha256 = model or os.getcwd(), sha256
        self.captioner = load_captioner(args)  # sets torch's threads and ORT's from args.threads
        self.sha256 = sha256
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict[str, np.ndarray]):
        import pyarrow as pa
        import torch

        from export.runtime.batch_output import schema

        errors = [str(e) for e in batch["error"]]
        good = [i for i, e in enumerate(errors) if not e]
        hyps = {}
        if good:
            images = torch.from_numpy(np.ascontiguousarray(batch["image"][good]))  # [G,3,S,S]
            hyps = dict(zip(good, self.captioner.caption_tensors(images)))
        vocab = self.captioner.vocab
        rows = []
        for i, path in enumerate(batch["path"]):
            hyp = hyps.get(i)
            words = vocab.decode_tokens(hyp.tokens) if hyp else []
            ids = [int(t) for t in hyp.tokens if int(t) not in (vocab.pad_id, vocab.start_id)][:len(words)] if hyp else None
            rows.append({"path": str(path), "caption": " ".join(words) if hyp else None,
                         "score": float(hyp.score) if hyp else None, "tokens": ids,
                         "error": errors[i] or None, "model_sha256": self.sha256})
        return pa.Table.from_pylist(rows, schema=schema()).append_column("node", pa.array([self.node] * len(rows)))
