"""ASI inside Hugging Face ``transformers.Trainer`` (and TRL on top of it), with or without ``peft``::

    import asi_core, asi_hf
    asi_core.patch(model, "asi", num_finetune=6, layer_type="linear", include="mlp", ranks=8)   # or patch_lora
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[asi_hf.ASICallback()])
    trainer.train()
    asi_core.unpatch(model); model.save_pretrained("out")   # a plain transformers checkpoint

Needs ``transformers`` (``pip install .[llm]``); ``asi_core`` itself stays plain PyTorch. The guide, with a complete
example run as written by the tests: docs/huggingface.md.
"""
from .callback import ASICallback, ASIWarning, checkpointed_patched_layers

__all__ = ["ASICallback", "ASIWarning", "attach", "checkpointed_patched_layers"]


def attach(trainer, callback: ASICallback | None = None) -> ASICallback:
    """Add ``callback`` (default: a new :class:`ASICallback`) to ``trainer`` *before* its reporting callbacks
    (TensorBoard, W&B, ...), so that they log the ``asi/*`` figures too (``Trainer(callbacks=[...])`` puts a callback
    after them: the console and ``trainer.state.log_history`` still show the figures, the reporters do not)."""
    callback = callback if callback is not None else ASICallback()
    handler = trainer.callback_handler
    handler.callbacks.insert(1 if handler.callbacks and type(handler.callbacks[0]).__name__ == "DefaultFlowCallback"
                             else 0, callback)
    return callback
