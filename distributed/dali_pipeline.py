"""The NVIDIA DALI image pipeline: file reader -> decode -> resize (+ random crop) -> normalize to CHW float.

It follows the transform rule of ``core.images.ImageTransform`` exactly (the torch loader's rule):

    eval : resize the whole image to (S, S), aspect ratio not kept, linear filter with antialiasing;
    train: resize to (S', S'), S' = core.images.train_resize_size(S) = round(1.125 S), then an S x S crop at a
           uniformly random integer offset; horizontal flip (p=0.5) only with hflip;
    then : x / 255 - ImageNet mean, / ImageNet std, per channel, CHW float32.

Only the images go through DALI. The reader's label of each file is its sample index (row of
``core.data.CaptionTable``); the captions are looked up by that index outside the pipeline, so variable-length
captions never need padding inside DALI. With a GPU the JPEG decode runs on it (``device="mixed"``); without,
everything runs on the CPU (``device_id=None``).
"""

from __future__ import annotations

from collections.abc import Sequence

from nvidia.dali import Pipeline, fn, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from core.images import IMAGENET_MEAN, IMAGENET_STD, train_resize_size

READER_NAME = "Reader"


def build_iterator(
    files: Sequence[str],
    labels: Sequence[int],
    image_size: int,
    train: bool,
    batch_size: int,
    num_threads: int,
    device_id: int | None,
    seed: int,
    hflip: bool = False,
    shard_id: int = 0,
    num_shards: int = 1,
    prefetch: int = 2,
) -> DALIGenericIterator:
    """The pipeline, built and wrapped in a DALIGenericIterator yielding ``{"images", "labels"}`` batches: images
    float32 [3, S, S], label int32 per sample.

    ``device_id=None`` runs the pipeline on the CPU; with a device id the decode runs on that GPU and the
    images come out as CUDA tensors there. ``pad_last_batch`` repeats the shard's last sample to fill its last
    batch, so every shard runs the same number of iterations; the iterator (reader_name, LastBatchPolicy.PARTIAL)
    drops the padding again. Files are read in the given order (the sampler shuffles, see ``distributed.loaders``);
    ``stick_to_shard`` keeps each shard on its own files when the pipeline is reset for another pass.
    """
    pipe = Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                    prefetch_queue_depth=prefetch)
    with pipe:
        encoded, label = fn.readers.file(
            files=list(files),
            labels=list(labels),
            name=READER_NAME,
            shard_id=shard_id,
            num_shards=num_shards,
            stick_to_shard=True,
            pad_last_batch=True,
            random_shuffle=False,
        )
        images = fn.decoders.image(encoded, device="cpu" if device_id is None else "mixed", output_type=types.RGB)
        s = image_size
        r = train_resize_size(s) if train else s
        images = fn.resize(images, resize_x=r, resize_y=r, interp_type=types.INTERP_LINEAR, antialias=True)
        crop_args = {}
        if train and r > s:
            # crop_pos in [0, 1] places the window at pos * (r - s): these values give the integer offsets 0..r-s,
            # each with the same probability, as torch.randint(0, r - s + 1) does in core.data.
            positions = [k / (r - s) for k in range(r - s + 1)]
            crop_args = dict(
                crop=(s, s),
                crop_pos_x=fn.random.uniform(values=positions),
                crop_pos_y=fn.random.uniform(values=positions),
            )
        mirror = fn.random.coin_flip(probability=0.5) if (train and hflip) else 0
        images = fn.crop_mirror_normalize(
            images,
            dtype=types.FLOAT,
            output_layout="CHW",
            mean=[255.0 * m for m in IMAGENET_MEAN],
            std=[255.0 * v for v in IMAGENET_STD],
            mirror=mirror,
            **crop_args,
        )
        pipe.set_outputs(images, label)
    pipe.build()
    return DALIGenericIterator(
        pipe,
        ["images", "labels"],
        reader_name=READER_NAME,
        last_batch_policy=LastBatchPolicy.PARTIAL,
        auto_reset=False,
    )
