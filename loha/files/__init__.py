"""Untrusted bytes in, checked objects out: safetensors files, network files, PEFT folders, checkpoints.

Nothing here knows a model: matching names to weights is `loha.keys`' job.
"""
