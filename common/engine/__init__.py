"""The engine core: model, loader, demo checkpoint, KV cache, block manager, scheduler, sampler, engines."""
