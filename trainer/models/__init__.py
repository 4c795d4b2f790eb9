"""The trainer's model layer: LLMs by name (``llm``), projectors (``projector``), the ``VisualLM`` wrapper
(``vlm``) and text->visual attention capture (``attention``).

Import the submodules directly (``from trainer.models.vlm import VisualLM``); this ``__init__`` imports
nothing so that ``import trainer.models`` stays free of torch/transformers start-up cost. See docs/models.md.
"""
