"""What COCO evaluation can use in this detectron2 install."""

import importlib.util

# detectron2 built without its C++ ops (dev/install_detectron2.py) has no fast COCOeval; pass
# this as COCOEvaluator's use_fast_impl to fall back to pycocotools' own
HAS_DETECTRON2_OPS = importlib.util.find_spec("detectron2._C") is not None
