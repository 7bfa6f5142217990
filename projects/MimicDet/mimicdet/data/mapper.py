"""detectron2's DatasetMapper, with errors on unreadable images that name the file at fault and an
optional top-to-bottom flip (``INPUT.RANDOM_FLIP_VERTICAL``)."""

from typing import Sequence

from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import transforms as T
from detectron2.utils.file_io import PathManager
from PIL import Image

__all__ = ["MimicDetDatasetMapper"]

# What PIL raises for a missing, truncated, corrupt or unknown-format image; bombs are huge images.
_READ_ERRORS = (OSError, SyntaxError, Image.DecompressionBombError)

# More than 8 bits per channel: detectron2's read_image would clip these to 0-255 without a word.
_HIGH_BIT_DEPTH_MODES = ("I", "F")


class MimicDetDatasetMapper(DatasetMapper):
    """
    Same mapping as detectron2's :class:`DatasetMapper`, but when an image cannot be read the
    error names the file (and the dataset) and is chained from PIL's original error, which often
    names neither (e.g. "image file is truncated"). It keeps the original exception type, so e.g.
    ``FileNotFoundError`` stays catchable as such.

    Images of 8 bits per channel in any layout (grayscale "L", palette "P", "LA", RGBA, CMYK)
    already come out with 3 channels in ``INPUT.FORMAT``: detectron2's ``read_image`` converts them
    with PIL (dropping alpha). Images with more bits per channel (16-bit or float "I;16", "I",
    "F") raise ``ValueError`` instead, as PIL's conversion would saturate or zero them.
    """

    @configurable
    def __init__(self, is_train: bool, *, dataset_names: Sequence[str] = (), **kwargs):
        """
        Args:
            is_train, kwargs: see :class:`DatasetMapper`.
            dataset_names: names of the datasets this mapper reads from, only to name them in
                errors; a record does not say which dataset it came from.
        """
        super().__init__(is_train, **kwargs)
        self.dataset_names = tuple(dataset_names)

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        # a config without add_mimicdet_config (e.g. detectron2's own) has no such key
        if is_train and cfg.INPUT.get("RANDOM_FLIP_VERTICAL", False):
            if cfg.INPUT.RANDOM_FLIP == "vertical":
                raise ValueError(
                    "INPUT.RANDOM_FLIP_VERTICAL adds a top-to-bottom flip, but INPUT.RANDOM_FLIP "
                    "is already 'vertical': set RANDOM_FLIP to 'horizontal' or 'none'"
                )
            ret["augmentations"].append(T.RandomFlip(horizontal=False, vertical=True))
        ret["dataset_names"] = cfg.DATASETS.TRAIN if is_train else cfg.DATASETS.TEST
        return ret

    def __call__(self, dataset_dict):
        file_name = dataset_dict["file_name"]
        try:
            # Opening reads only the header, so this costs little next to decoding.
            with PathManager.open(file_name, "rb") as f:
                mode = Image.open(f).mode
            if mode.split(";")[0] in _HIGH_BIT_DEPTH_MODES:
                raise ValueError(
                    f"Image {file_name}{self._from_datasets()} has PIL mode '{mode}' (more than "
                    "8 bits per channel), which would be clipped to 0-255 when read. Convert it "
                    "to 8-bit RGB with the scaling that suits the data."
                )
            # Reading the image is the only file access of a detection mapping, so an error of
            # these types from here is about that image.
            return super().__call__(dataset_dict)
        except _READ_ERRORS as e:
            raise type(e)(
                f"Cannot read image {file_name}{self._from_datasets()}: {type(e).__name__}: {e}"
            ) from e

    def _from_datasets(self):
        if not self.dataset_names:
            return ""
        return " (from dataset " + ", ".join(f"'{n}'" for n in self.dataset_names) + ")"
