"""ollama: write a Modelfile next to model.gguf and import it into Ollama.

The REST API when a server answers (blob HEAD first: nothing is uploaded twice),
else the `ollama` CLI, else skip with the command to run by hand.
"""

from __future__ import annotations

from typing import Any

from lorad import ollama
from lorad.fsutil import atomic_write_text
from lorad.stages import Skipped, StageContext, StageFailed


def run(ctx: StageContext) -> dict[str, str]:
    from mlx_lm.utils import load_tokenizer

    gguf = ctx.path("model.gguf")
    if not gguf.exists():
        raise StageFailed("no model.gguf: run the gguf stage first")
    spec = ctx.spec["ollama"]
    name = spec.get("model") or ctx.spec["name"]
    tokenizer = load_tokenizer(ctx.path("fused"))
    chat_template = getattr(tokenizer, "chat_template", None)
    family = ollama.chat_family(chat_template)
    template = ollama.TEMPLATES.get(family or "")
    system = spec.get("system")
    if system is None and family:
        system = ollama.default_system(
            lambda msgs: tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False), family)
    eos = [tokenizer.convert_ids_to_tokens(i) for i in sorted(tokenizer.eos_token_ids)]
    stops = ollama.stop_tokens(family, eos)
    if template is None:
        ctx.log.warning("ollama_template_unknown", hint="no Go TEMPLATE written: Ollama ≥ 0.30 uses the GGUF's own "
                        "chat template; older versions need one added to the Modelfile by hand")
    atomic_write_text(ctx.path("Modelfile"), ollama.modelfile(gguf.name, template, stops, system))
    ctx.log.info("modelfile_written", family=family, stops=stops, system=bool(system))
    artifacts = {"modelfile": "Modelfile"}
    from lorad.policy import PolicyError, from_env

    policy = from_env()
    try:
        host = policy.resolve_ollama(spec.get("host")) if policy else ollama.resolve_host(spec.get("host"))
    except PolicyError as e:
        raise StageFailed(str(e)) from None
    manual = f"cd {ctx.work_dir} && ollama create {name} -f Modelfile && ollama run {name}"
    result: dict[str, Any] | None
    try:
        version = ollama.server_version(host)
        if version is not None:
            result = ollama.import_via_api(host, gguf, name, template, stops, system, ctx.log)
            result["server_version"] = version
        else:
            result = ollama.import_via_cli(ctx.work_dir, name)
    except ollama.OllamaError as e:
        raise StageFailed(f"{e}. To import by hand: {manual}") from None
    if result is None:
        raise Skipped(f"no Ollama server answered at {host} and no `ollama` command is installed; "
                      f"the Modelfile is ready. To import by hand: {manual}", artifacts)
    ctx.log.info("ollama_imported", model=name, run=f"ollama run {name}", **result)
    return artifacts
