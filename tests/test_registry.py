"""models.yaml validation: every mistake is named with its file, entry and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.durations import parse_duration
from server.errors import ModelNotFound, RegistryError
from server.registry import Registry
from server.settings import PROJECT_ROOT, Settings

TEMPLATES = PROJECT_ROOT / "templates"


def write(tmp_path: Path, body: str) -> Path:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    path = tmp_path / "models.yaml"
    path.write_text(body)
    return path


def load(path: Path) -> Registry:
    return Registry.load(path, TEMPLATES, path.parent / "models")


def test_shipped_registry_loads_with_the_default_model() -> None:
    settings = Settings()
    registry = Registry.load(settings.models_file, settings.templates_dir, settings.models_dir)
    assert registry.default == "smollm2-135m-instruct"
    assert registry.local_file(registry.get(registry.default)).name == \
        "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_unknown_key_names_file_entry_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "models:\n  tiny:\n    path: m.gguf\n    temprature: 0.5\n")
    with pytest.raises(RegistryError) as err:
        load(path)
    assert str(err.value) == f"{path}: model 'tiny': unknown key 'temprature'"


def test_unknown_nested_key(tmp_path: Path) -> None:
    path = write(tmp_path, "models:\n  tiny:\n    path: m.gguf\n    sampling: {topp: 1}\n")
    with pytest.raises(RegistryError, match=r"model 'tiny': unknown key 'sampling.topp'"):
        load(path)


def test_missing_file(tmp_path: Path) -> None:
    path = write(tmp_path, "models:\n  tiny:\n    path: nowhere.gguf\n")
    with pytest.raises(RegistryError) as err:
        load(path)
    assert f"{path}: model 'tiny': field 'path': GGUF file not found:" in str(err.value)
    assert "nowhere.gguf" in str(err.value)


def test_missing_package(tmp_path: Path) -> None:
    path = write(tmp_path, "models:\n  p:\n    package: no_such_pkg\n    file: x.gguf\n")
    with pytest.raises(RegistryError, match="'no_such_pkg' is not installed"):
        load(path)


def test_unknown_template(tmp_path: Path) -> None:
    path = write(tmp_path, "models:\n  tiny:\n    path: m.gguf\n    template: chatmlx\n")
    with pytest.raises(RegistryError) as err:
        load(path)
    assert f"{path}: model 'tiny': field 'template': unknown template 'chatmlx'" in \
        str(err.value)


def test_bad_values_and_sources(tmp_path: Path) -> None:
    path = write(tmp_path, "models:\n  t:\n    path: m.gguf\n    n_ctx: many\n")
    with pytest.raises(RegistryError, match=r"model 't': field 'n_ctx': Input should be"):
        load(path)
    path = write(tmp_path, "models:\n  t:\n    repo: a/b\n")
    with pytest.raises(RegistryError, match=r"model 't': 'repo' needs 'file'"):
        load(path)
    path = write(tmp_path, "models:\n  t: {}\n")
    with pytest.raises(RegistryError, match="give exactly one source"):
        load(path)


def test_default_must_exist_and_unknown_model_is_404(tmp_path: Path) -> None:
    path = write(tmp_path, "default: other\nmodels:\n  tiny:\n    path: m.gguf\n")
    with pytest.raises(RegistryError, match="default model 'other' is not an entry"):
        load(path)
    registry = load(write(tmp_path, "models:\n  tiny:\n    path: m.gguf\n"))
    with pytest.raises(ModelNotFound) as err:
        registry.get("gpt-4")
    assert err.value.status_code == 404 and "tiny" in err.value.message


def test_not_yaml(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="not valid YAML"):
        load(write(tmp_path, "models: [\n"))


def test_gpu_layers_and_keep_alive_forms(tmp_path: Path) -> None:
    registry = load(write(tmp_path, "models:\n  a:\n    path: m.gguf\n    n_gpu_layers: auto\n"
                                    "    keep_alive: 5m\n  b:\n    path: m.gguf\n"
                                    "    n_gpu_layers: 12\n    keep_alive: -1\n"))
    assert registry.get("a").n_gpu_layers == "auto" and registry.get("a").keep_alive == 300
    assert registry.get("b").n_gpu_layers == 12 and registry.get("b").keep_alive == -1
    for bad, field in [("n_gpu_layers: -2", "n_gpu_layers"), ("n_gpu_layers: most", "n_gpu_layers"),
                       ("keep_alive: soon", "keep_alive")]:
        with pytest.raises(RegistryError, match=f"model 'a'.*{field}"):
            load(write(tmp_path, f"models:\n  a:\n    path: m.gguf\n    {bad}\n"))


@pytest.mark.parametrize(("given", "seconds"), [
    (30, 30.0), ("-1", -1.0), ("0", 0.0), ("90s", 90.0), ("5m", 300.0), ("1h30m", 5400.0),
    ("250ms", 0.25), ("-1m", -60.0)])
def test_durations(given: float | str, seconds: float) -> None:
    assert parse_duration(given) == seconds


def test_a_bad_duration_says_what_is_accepted() -> None:
    with pytest.raises(ValueError, match="'5m'"):
        parse_duration("five minutes")


def test_embedding_entries_and_their_pooling(tmp_path: Path) -> None:
    registry = load(write(tmp_path, "models:\n  e:\n    path: m.gguf\n    embedding: true\n"
                                    "    pooling: cls\n  g:\n    path: m.gguf\n"))
    assert registry.get("e").embedding and registry.get("e").pooling == "cls"
    assert not registry.get("g").embedding and registry.get("g").pooling is None
    with pytest.raises(RegistryError, match="model 'e': field 'pooling'"):
        load(write(tmp_path, "models:\n  e:\n    path: m.gguf\n    embedding: true\n"
                             "    pooling: max\n"))
    with pytest.raises(RegistryError, match="'pooling' applies to embedding models only"):
        load(write(tmp_path, "models:\n  e:\n    path: m.gguf\n    pooling: mean\n"))


def test_shipped_registry_has_embedding_models() -> None:
    settings = Settings()
    registry = Registry.load(settings.models_file, settings.templates_dir, settings.models_dir)
    smollm2 = registry.get("smollm2-135m-embed")
    assert smollm2.embedding and smollm2.pooling == "mean"
    assert registry.local_file(smollm2) == registry.local_file(registry.get(registry.default))
    nomic = registry.get("nomic-embed-text-v1.5:f16")
    assert nomic.embedding and nomic.file_name == "nomic-embed-text-v1.5.f16.gguf"


LORA = "models:\n  m:\n    path: m.gguf\n    lora:\n"


def test_lora_adapters_are_served_as_id_colon_name(tmp_path: Path) -> None:
    (tmp_path / "sql.gguf").write_bytes(b"GGUF")
    registry = load(write(tmp_path, LORA + "      - {name: sql, path: sql.gguf, scale: 0.5}\n"
                                           "      - {name: fr, repo: org/fr, file: fr.gguf}\n"))
    spec = registry.get("m")
    assert [(a.name, a.scale) for a in spec.lora] == [("sql", 0.5), ("fr", 1.0)]
    assert registry.get("m:sql") is spec and spec.served_adapter("m:sql") == "sql"
    assert spec.served_adapter("m") is None and spec.served_adapter("m:nope") is None
    assert registry.lora_file(spec.lora[0]) == tmp_path / "sql.gguf"
    assert registry.lora_file(spec.lora[1]) == tmp_path / "models" / "org--fr" / "fr.gguf"
    with pytest.raises(ModelNotFound, match=r"'m' has no LoRA adapter 'nope'\. Its adapters: "
                                            r"m:sql, m:fr\."):
        registry.get("m:nope")


@pytest.mark.parametrize(("entries", "message"), [
    ("      - {name: a, path: m.gguf}\n      - {name: a, path: m.gguf}\n",
     r"model 'm': field 'lora': adapter names must be unique; repeated: \['a'\]"),
    ("      - {name: 'a:b', path: m.gguf}\n",
     r"model 'm': field 'lora\.0\.name': 'a:b': a LoRA adapter's name is served as "
     r"'<model id>:<name>', so it must be non-empty, without ':'"),
    ("      - {name: a, path: m.gguf}\n      - {path: m.gguf}\n",
     r"field 'lora\.1\.name': Field required"),
    ("      - {name: a}\n", r"adapter 'a': give 'path', or 'repo' with 'file'"),
    ("      - {name: a, path: m.gguf, repo: o/r, file: f.gguf}\n",
     r"adapter 'a': give 'path', or 'repo' with 'file'"),
    ("      - {name: a, repo: o/r}\n", r"adapter 'a': 'file' goes with 'repo'"),
    ("      - {name: a, path: nowhere.gguf}\n",
     r"model 'm': adapter 'a': field 'path': GGUF file not found: .*nowhere\.gguf"),
    ("      - {name: a, path: m.gguf, scael: 1}\n", r"unknown key 'lora\.0\.scael'"),
])
def test_lora_mistakes_name_the_entry_and_field(tmp_path: Path, entries: str,
                                                message: str) -> None:
    with pytest.raises(RegistryError, match=message):
        load(write(tmp_path, LORA + entries))


def test_lora_names_that_would_be_ambiguous_are_refused(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match=r"adapter names \['Q8_0'\] are also quants"):
        load(write(tmp_path, "models:\n  m:\n    repo: o/r\n    file: m-{quant}.gguf\n"
                             "    quant: Q4_0\n    quants: [Q4_0, Q8_0]\n"
                             "    lora: [{name: Q8_0, path: m.gguf}]\n"))
    with pytest.raises(RegistryError, match=r"adapter 'x': 'm:x' is also an entry's id"):
        load(write(tmp_path, LORA + "      - {name: x, path: m.gguf}\n"
                             "  'm:x':\n    path: m.gguf\n"))
    with pytest.raises(RegistryError, match="'lora' applies to generating models only"):
        load(write(tmp_path, LORA + "      - {name: x, path: m.gguf}\n    embedding: true\n"))
