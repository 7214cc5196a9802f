"""The saved folder is a Hub repo: flat code that imports only torch/transformers, loadable with
trust_remote_code in a process where bd3lm_hf cannot be imported."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import random_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM
from transformers.dynamic_module_utils import get_imports

import bd3lm_hf

MODELING = Path(bd3lm_hf.modeling.__file__).parent
ALLOWED = {"torch", "transformers"}


@pytest.mark.parametrize("path", sorted(MODELING.glob("*.py")), ids=lambda p: p.name)
def test_modeling_files_import_only_torch_and_transformers(path):
    external = {name for name in get_imports(path) if name not in sys.stdlib_module_names}
    assert external <= ALLOWED, f"{path.name} imports {external - ALLOWED}"


def test_modeling_folder_is_flat():
    assert not [p for p in MODELING.rglob("*.py") if p.parent != MODELING]


BLOCK_IMPORT = textwrap.dedent("""
    import importlib.abc, sys
    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "bd3lm_hf" or name.startswith("bd3lm_hf."):
                raise ImportError("bd3lm_hf is deliberately not importable here")
    sys.meta_path.insert(0, Refuse())
""")


def test_saved_folder_loads_in_a_fresh_process_without_the_package(tmp_path):
    model = random_model()
    model.save_pretrained(tmp_path / "repo")
    files = {p.name for p in (tmp_path / "repo").iterdir()}
    code_files = {path.name for path in MODELING.glob("*_bd3lm.py")}  # every file the model imports, copied
    assert len(code_files) == 9 and {"config.json", "model.safetensors"} | code_files <= files
    auto_map = json.loads((tmp_path / "repo" / "config.json").read_text())["auto_map"]
    assert auto_map == {"AutoConfig": "configuration_bd3lm.BD3LMConfig", "AutoModel": "modeling_bd3lm.BD3LMModel",
                        "AutoModelForCausalLM": "modeling_bd3lm.BD3LMForBlockDiffusion",
                        "AutoModelForMaskedLM": "modeling_bd3lm.BD3LMForBlockDiffusion"}
    model.model.save_pretrained(tmp_path / "backbone")  # the base model alone, as AutoModel gives it
    assert json.loads((tmp_path / "backbone" / "config.json").read_text())["auto_map"] == auto_map
    assert (tmp_path / "backbone" / "modeling_bd3lm.py").is_file()
    ids = torch.randint(0, 49, (2, 16))
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        torch.save(model(input_ids=ids).logits, tmp_path / "expected.pt")
    script = BLOCK_IMPORT + textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForMaskedLM
        try:
            import bd3lm_hf  # noqa: F401
        except ImportError:
            importable = False
        else:
            importable = True
        assert not importable, "bd3lm_hf was importable"
        for auto in (AutoModelForCausalLM, AutoModelForMaskedLM):
            model = auto.from_pretrained({str(tmp_path / 'repo')!r}, trust_remote_code=True).eval()
            assert "bd3lm_hf" not in type(model).__module__, type(model).__module__
            with torch.no_grad():
                logits = model(input_ids=torch.load({str(tmp_path / 'ids.pt')!r})).logits
            assert torch.equal(logits, torch.load({str(tmp_path / 'expected.pt')!r})), "logits differ"
        from transformers import AutoModel
        for folder in ({str(tmp_path / 'repo')!r}, {str(tmp_path / 'backbone')!r}):
            backbone = AutoModel.from_pretrained(folder, trust_remote_code=True)
            assert type(backbone).__name__ == "BD3LMModel", type(backbone).__name__
        # a saved backbone takes a fresh head, as transformers' base models do; its generation config is checked
        with_head = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'backbone')!r}, trust_remote_code=True)
        assert torch.equal(with_head.model.embed_tokens.weight, backbone.embed_tokens.weight)
        loaded = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'repo')!r}, trust_remote_code=True)
        assert type(loaded.generation_config).__name__ == "BD3LMGenerationConfig"
        print("OK")
    """)
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin",
           "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_register_auto_classes_resolves_in_process(tmp_path):
    bd3lm_hf.register_auto_classes()
    random_model().save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)).__name__ == "BD3LMConfig"
    for auto in (AutoModelForCausalLM, AutoModelForMaskedLM):
        assert isinstance(auto.from_pretrained(tmp_path), bd3lm_hf.BD3LMForBlockDiffusion)
