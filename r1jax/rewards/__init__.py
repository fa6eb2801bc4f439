"""Rule-based and model-based rewards, evaluated on the host.

math.py (answer extraction + math-verify), format.py (R1-Zero template), language.py
(language consistency), code.py (test cases) on sandbox.py + jail.py (the sandbox;
tools/sandbox_check.py checks it), length.py (overlong / cosine shaping), registry.py (named rewards, the hook for
reward models), reward_model.py (Bradley–Terry reward models: scoring, save/load, the registry
hook; trained by stages/reward_model.py), compose.py (the config's reward spec -> per-sample
rewards), pool.py (worker processes with hard timeouts, overlapped with device work).
"""
