"""What runs on the Ray workers: decoding (CPU tasks) and captioning (an actor per model copy). No Ray import here.

``read_and_decode`` reads a chunk of files (one caption batch) through the job's pyarrow filesystem and makes them
the model's input with core.images' loader (the caption command's: same formats, pixel limit and reduced-scale JPEG
decoding), a file that is not a usable image keeping its error. ``CaptionActor`` loads one Captioner when Ray starts it (through
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


def read_and_decode(batch: dict[str, np.ndarray], fs, preprocess: dict[str, Any]) -> dict[str, np.ndarray]:
    """Rows of chunks {"paths": [file system paths], "known": [the listing's error or ""]} -> {"paths", "images"
    (float32 [n,3,S,S] as bytes), "errors" ("" when the image is good)}. One row is one caption batch: its files in
    their order, as the caption command batches them (int8's dynamic quantization scales by the batch: the same
    batches give the same captions)."""
    transform = transform_for(preprocess)
    size = int(preprocess["image_size"])
    out_images, out_errors = [], []
    for paths, known in zip(batch["paths"], batch["known"]):
        images = np.zeros((len(paths), 3, size, size), np.float32)  # [n,3,S,S]; zeros where the file failed
        errors = []
        for i, path in enumerate(paths):
            if known[i]:
                errors.append(str(known[i]))
                continue
            try:
                with fs.open_input_file(str(path)) as f:
                    data = f.read()
                images[i] = transform(load_image_bytes(data, str(path), reduce_for=size)).numpy()
                errors.append("")
            except ImageLoadError as e:
                errors.append(str(e))
            except OSError as e:  # gone or unreadable since it was listed
                errors.append(f"{path}: {e.strerror or e}")
        out_images.append(images.tobytes())
        out_errors.append(errors)
    return {"paths": batch["paths"], "images": np.array(out_images, dtype=object),
            "errors": np.array(out_errors + [None], dtype=object)[:-1]}


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
        """One row (one chunk of files, batch_size=1) -> its result rows, captioned as one batch."""
        import pyarrow as pa

        from export.runtime.batch.output import schema

        tables = [self.caption_chunk(list(paths), images, list(errors))
                  for paths, images, errors in zip(batch["paths"], batch["images"], batch["errors"])]
        return pa.concat_tables(tables).append_column("node", pa.array([self.node] * sum(map(len, tables)))) \
            if tables else schema().empty_table()

    def caption_chunk(self, paths: list[str], images: bytes, errors: list[str]):
        import pyarrow as pa
        import torch

        from export.runtime.batch.output import schema

        size = self.captioner.image_size
        pixels = np.frombuffer(images, np.float32).reshape(len(paths), 3, size, size)  # [n,3,S,S]
        good = [i for i, e in enumerate(errors) if not e]
        hyps = {}
        if good:  # the good images of the chunk, as the caption command batches them
            hyps = dict(zip(good, self.captioner.caption_tensors(torch.from_numpy(pixels[good]))))
        vocab = self.captioner.vocab
        rows = []
        for i, path in enumerate(paths):
            hyp = hyps.get(i)
            words = vocab.decode_tokens(hyp.tokens) if hyp else []
            ids = [int(t) for t in hyp.tokens if int(t) not in (vocab.pad_id, vocab.start_id)][:len(words)] if hyp else None
            rows.append({"path": str(path), "caption": " ".join(words) if hyp else None,
                         "score": float(hyp.score) if hyp else None, "tokens": ids,
                         "error": errors[i] or None, "model_sha256": self.sha256})
        return pa.Table.from_pylist(rows, schema=schema())
