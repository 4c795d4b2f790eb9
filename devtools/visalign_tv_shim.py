"""Development/CI-only shim for this CPU machine's broken torchvision wheel.

The package registry here only has a CUDA build of ``torchvision==0.28.0`` (the release that pins
``torch==2.13.0``). With the CPU torch its compiled ops cannot load, and ``import torchvision`` dies in
``_meta_registrations`` with ``operator torchvision::nms does not exist``. That poisons timm, open_clip,
transformers' vision models and the accelerate CLI.

On the first ``import torchvision`` this finder tries to load torchvision's compiled library; if that
fails it defines the schemas of ``torchvision::nms``/``qnms`` (no kernels), so torchvision imports and
everything except its C++ ops works. On a machine with a matching torchvision it does nothing.

``make venv`` installs it into the project's *development* virtualenv only (this module plus a one-line
``.pth``), so it also covers subprocesses such as ``accelerate launch``. It is never part of the
installed ``visalign`` distribution and never touches a user's environment.
"""

import importlib.abc
import importlib.util
import sys

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


class _TorchvisionOpsFinder(importlib.abc.MetaPathFinder):
    _done = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision" or self._done:
            return None
        type(self)._done = True
        spec = importlib.util.find_spec("torchvision")  # the real one; we never replace it
        if spec is None or not spec.submodule_search_locations:
            return None
        import glob
        import os

        import torch

        libs = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "_C*.so"))
        try:
            torch.ops.load_library(libs[0])
            return None  # a matching build: nothing to do
        except Exception:
            pass
        lib = torch.library.Library("torchvision", "FRAGMENT")  # noqa: TOR901 - kept alive below
        for schema in _SCHEMAS.values():
            try:
                lib.define(schema)
            except RuntimeError:
                pass  # already defined by a partial load
        sys.modules[__name__]._lib = lib
        return None


if not any(isinstance(f, _TorchvisionOpsFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _TorchvisionOpsFinder())
