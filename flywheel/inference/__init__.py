"""Generating with the student: the engines (`engine.HFEngine`, `vllm_engine.VLLMEngine`), batched LoRA slots
(`lora`) and per-row tool-call grammars (`grammar`). Serve answers with them, evaluation scores with them and
sweeps rank trials with them, so they live below every stage rather than inside one."""
