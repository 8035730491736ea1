"""The adapter registry (chatapp.learning.registry) with real peft adapters on the demo model: versions,
the active pointer and rollback, loading a version with plain peft, validation against the base
model's fingerprint, SIGKILL at every step of publishing, and the `adapters` command."""
import argparse
import copy
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from chatapp.learning import adapters_cli
from chatapp.demo import shapes
from chatapp.learning.fingerprint import AdapterError, base_fingerprint, feedback_digest
from chatapp.learning.registry import Registry
from chatapp.serving.engine import Engine
from chatapp.core.errors import EngineError
from support import ROOT, subprocess_env

TARGETS = r".*text_model.*\.(q_proj|v_proj)"


def logits_of(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A demo model of its own (get_peft_model changes the model it wraps), an untouched copy,
    its fingerprint, a LoRA adapter whose B weights are random (so it changes the logits), and
    that adapter saved by plain peft."""
    engine = Engine.load("demo")
    pristine = copy.deepcopy(engine.model)
    fingerprint = base_fingerprint(engine.model)
    template = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is it?"}]}]
    prompt = engine.processor.apply_chat_template(template, add_generation_prompt=True)
    image = shapes.render(shapes.random_scene(random.Random(0)))
    inputs = engine.processor(text=[prompt], images=[[image]], return_tensors="pt")
    torch.manual_seed(0)
    model = get_peft_model(engine.model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    model.eval()
    logits = logits_of(model, inputs)
    with model.disable_adapter():
        base_logits = logits_of(model, inputs)
    assert (logits - base_logits).abs().max() > 0.05  # the adapter matters
    saved = tmp_path_factory.mktemp("saved") / "adapter"
    model.save_pretrained(saved)
    return SimpleNamespace(model=model, pristine=pristine, fingerprint=fingerprint, inputs=inputs,
                           logits=logits, base_logits=base_logits, saved=saved)


def meta(demo, **changes) -> dict:
    out = {"base_model": "demo", "base_fingerprint": demo.fingerprint, "method": "sft-lora",
           "hyperparameters": {"r": 4, "lr": 2e-3}, "feedback_ids": [3, 1, 2],
           "metrics": {"auc": 0.97, "accuracy": 0.99}, "gate": {"decision": "promoted", "reason": "auc >= 0.8"}}
    out.update(changes)
    return out


def load_with_peft(demo, folder):
    """Load a version folder the way any peft user would, on a fresh copy of the base."""
    model = PeftModel.from_pretrained(copy.deepcopy(demo.pristine), str(folder))
    model.eval()
    return model


# ---------------------------------------------------------------- versions and the active pointer

def test_publish_list_show_activate_rollback_deactivate_delete(demo, tmp_path):
    registry = Registry(tmp_path / "adapters")
    assert registry.list() == [] and registry.active() is None
    assert not (tmp_path / "adapters").exists()  # reading creates nothing

    v1 = registry.publish(demo.model, meta(demo))  # a PeftModel
    v2 = registry.publish(demo.saved, meta(demo, parent="v1", method="kto-lora", metrics={"auc": 0.91}))  # a folder
    assert (v1, v2) == ("v1", "v2")
    assert registry.active() is None  # publishing does not activate
    for version in (v1, v2):
        folder = tmp_path / "adapters" / version
        names = sorted(p.name for p in folder.iterdir())
        assert {"adapter_config.json", "adapter_model.safetensors", "chatapp-adapter.json"} <= set(names), names
        assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl"))]

    rows = registry.list()
    assert [(r["version"], r["method"], r["gate"], r["parent"], r["active"]) for r in rows] == [
        ("v1", "sft-lora", "promoted", None, False), ("v2", "kto-lora", "promoted", "v1", False)]
    assert rows[1]["metrics"] == {"auc": 0.91}

    shown = registry.show("2")
    assert shown["version"] == "v2" and shown["parent"] == "v1" and shown["base_model"] == "demo"
    assert shown["base_fingerprint"] == demo.fingerprint
    assert shown["feedback"] == {"ids": [3, 1, 2], "count": 3, "sha256": feedback_digest([1, 2, 3])}
    assert shown["hyperparameters"] == {"r": 4, "lr": 2e-3} and shown["gate"]["reason"] == "auc >= 0.8"
    assert shown["peft"]["peft_type"] == "LORA" and shown["peft"]["r"] == 4
    assert set(shown["files"]) >= {"adapter_config.json", "adapter_model.safetensors"}
    assert shown["created_at"].endswith("+00:00")

    assert registry.activate("v1", "first") == "v1" and registry.active() == "v1"
    registry.activate("v2", "better")
    assert registry.active() == "v2"
    assert [r["active"] for r in registry.list()] == [False, True]
    assert [e["action"] for e in registry.show("v2")["activations"]] == ["activate"]
    with pytest.raises(AdapterError, match="active"):
        registry.delete("v2")
    assert registry.rollback() == "v1" and registry.active() == "v1"
    assert registry.rollback() is None and registry.active() is None  # back to the base model
    with pytest.raises(AdapterError, match="nothing to roll back"):
        registry.rollback()

    registry.activate("v2")
    assert registry.deactivate() == "v2" and registry.active() is None
    assert registry.rollback() == "v2"  # undoes the deactivation

    registry.delete("v1")
    assert registry.versions() == ["v2"]
    registry.activate("v2")  # already active: no change
    v3 = registry.publish(demo.saved, meta(demo))
    registry.delete(v3)  # the highest number: still never reused
    assert registry.publish(demo.saved, meta(demo)) == "v4"
    assert registry.versions() == ["v2", "v4"]
    assert not [p.name for p in (tmp_path / "adapters").iterdir() if p.name.startswith((".tmp-", ".trash-"))]
    state = json.loads((tmp_path / "adapters" / "ACTIVE").read_text())
    assert state["version"] == "v2" and "v1" not in state["previous"]  # a deleted version is not rolled back to
    with pytest.raises(AdapterError, match="no adapter v1"):
        registry.activate("v1")


def test_gate_decisions_and_metadata_checks(demo, tmp_path):
    registry = Registry(tmp_path / "adapters")
    rejected = registry.publish(demo.saved, meta(demo, gate={"decision": "rejected", "reason": "auc 0.4"}))
    with pytest.raises(AdapterError, match="gate rejected"):
        registry.activate(rejected)
    assert registry.activate(rejected, force=True) == rejected
    with pytest.raises(AdapterError, match="gate rejected"):
        registry.publish(demo.saved, meta(demo, gate={"decision": "rejected", "reason": ""}), activate=True)
    assert registry.publish(demo.saved, meta(demo, gate={"decision": "manual", "reason": "operator"}),
                            activate=True) == "v2"
    assert registry.active() == "v2"
    for bad, message in [({"method": ""}, "method"), ({"gate": {"decision": "maybe"}}, "gate"),
                         ({"feedback_ids": [1.5]}, "feedback_ids"), ({"metrics": [1]}, "metrics"),
                         ({"parent": "latest"}, "not an adapter version"), ({"epochs": 3}, "unknown metadata")]:
        with pytest.raises(AdapterError, match=message):
            registry.publish(demo.saved, meta(demo, **bad))
    assert registry.versions() == ["v1", "v2"]


def test_concurrent_publishers_get_distinct_numbers(demo, tmp_path):
    root = tmp_path / "adapters"
    results, errors = [], []

    def publish():
        try:
            results.append(Registry(root).publish(demo.saved, meta(demo)))
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=publish) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and sorted(results) == ["v1", "v2", "v3", "v4"]


# ---------------------------------------------------------------- loading with plain peft

def test_a_version_loads_in_plain_peft_with_the_same_logits(demo, tmp_path):
    registry = Registry(tmp_path / "adapters")
    from_model = registry.publish(demo.model, meta(demo))
    from_folder = registry.publish(demo.saved, meta(demo))
    for version in (from_model, from_folder):
        folder = registry.validate(version, demo.fingerprint)
        loaded = load_with_peft(demo, folder)
        logits = logits_of(loaded, demo.inputs)
        assert torch.allclose(logits, demo.logits, atol=1e-5), (logits - demo.logits).abs().max()
        assert not torch.allclose(logits, demo.base_logits, atol=1e-3)
        assert base_fingerprint(loaded) == demo.fingerprint


def test_publishing_a_peft_model_saves_its_active_adapter_whatever_its_name(demo, tmp_path):
    """peft saves an adapter not named "default" into a subfolder of that name: the registry
    still gets a flat folder, holding the adapter that was active."""
    registry = Registry(tmp_path / "adapters")
    model = PeftModel.from_pretrained(copy.deepcopy(demo.pristine), str(demo.saved), adapter_name="voted")
    model.add_adapter("fresh", LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))  # B = 0: the base
    model.eval()
    model.set_adapter("fresh")
    fresh = registry.publish(model, meta(demo))
    model.set_adapter("voted")
    voted = registry.publish(model, meta(demo))
    assert sorted(p.name for p in registry.validate(voted, demo.fingerprint).iterdir() if p.is_dir()) == []
    assert torch.allclose(logits_of(load_with_peft(demo, tmp_path / "adapters" / fresh), demo.inputs),
                          demo.base_logits, atol=1e-5)
    assert torch.allclose(logits_of(load_with_peft(demo, tmp_path / "adapters" / voted), demo.inputs),
                          demo.logits, atol=1e-5)


# ---------------------------------------------------------------- fingerprints and validation

def test_fingerprint_is_the_base_s_whatever_wraps_it(demo):
    assert base_fingerprint(demo.model) == demo.fingerprint  # the PeftModel around the base
    assert base_fingerprint(demo.model.get_base_model()) == demo.fingerprint  # lora layers injected in it
    assert base_fingerprint(demo.pristine) == demo.fingerprint
    assert len(demo.fingerprint) == 64
    bf16 = Engine.load("demo", dtype="bfloat16").model
    assert base_fingerprint(bf16) == demo.fingerprint  # the trainer in fp32, a GPU server in bf16


def test_fingerprint_differs_for_other_weights_of_the_same_architecture(demo):
    one_value = copy.deepcopy(demo.pristine)
    with torch.no_grad():
        one_value.lm_head.weight[0, 0] += 0.1
    one_tensor = copy.deepcopy(demo.pristine)
    with torch.no_grad():
        one_tensor.model.vision_model.encoder.layers[1].mlp.fc1.weight.mul_(1.01)  # "fine-tuned" slightly
    prints = {base_fingerprint(m) for m in (demo.pristine, one_value, one_tensor)}
    assert len(prints) == 3


def test_validate_refuses_what_it_must(demo, tmp_path):
    root = tmp_path / "adapters"
    registry = Registry(root)
    good = registry.publish(demo.saved, meta(demo))
    assert registry.validate(good, demo.fingerprint) == root / good
    assert registry.validate(good, None) == root / good

    other = copy.deepcopy(demo.pristine)
    with torch.no_grad():
        other.model.text_model.layers[0].mlp.down_proj.weight[0, 0] += 0.5
    other_print = base_fingerprint(other)
    with pytest.raises(AdapterError, match=f"another base model.*{demo.fingerprint[:12]}.*{other_print[:12]}") as e:
        registry.validate(good, other_print)
    assert isinstance(e.value, EngineError) and demo.fingerprint not in str(e.value)  # short forms only

    with pytest.raises(AdapterError, match=r"no adapter v9 .*published: v1"):
        registry.validate("v9", demo.fingerprint)
    with pytest.raises(AdapterError, match="not an adapter version"):
        registry.validate("../v1", None)

    def broken(change):
        version = registry.publish(demo.saved, meta(demo))
        change(root / version)
        return version

    no_meta = broken(lambda folder: (folder / "chatapp-adapter.json").unlink())
    with pytest.raises(AdapterError, match="no chatapp-adapter.json"):
        registry.validate(no_meta, demo.fingerprint)
    pickled = broken(lambda folder: (folder / "training_args.bin").write_bytes(b"\x80\x04N."))
    with pytest.raises(AdapterError, match=r"pickle files \(training_args.bin\)"):
        registry.validate(pickled, demo.fingerprint)
    no_weights = broken(lambda folder: (folder / "adapter_model.safetensors").unlink())
    with pytest.raises(AdapterError, match="no adapter_model.safetensors"):
        registry.validate(no_weights, demo.fingerprint)

    def flip_a_byte(folder):
        path = folder / "adapter_model.safetensors"
        data = bytearray(path.read_bytes())
        data[-1] ^= 1
        path.write_bytes(bytes(data))

    altered = broken(flip_a_byte)
    with pytest.raises(AdapterError, match="differs from the file that was published"):
        registry.validate(altered, demo.fingerprint)
    assert [r["version"] for r in registry.list() if "error" in r] == [no_meta]  # listed, flagged
    with pytest.raises(AdapterError):
        registry.activate(pickled)


def test_publish_refuses_pickle_weights_and_incomplete_folders(demo, tmp_path):
    registry = Registry(tmp_path / "adapters")
    source = tmp_path / "source"
    shutil.copytree(demo.saved, source)
    (source / "adapter_model.bin").write_bytes(b"\x80\x04N.")
    with pytest.raises(AdapterError, match="pickle files"):
        registry.publish(source, meta(demo))
    (source / "adapter_model.bin").unlink()
    (source / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="no adapter_model.safetensors"):
        registry.publish(source, meta(demo))
    with pytest.raises(AdapterError, match="not a folder"):
        registry.publish(tmp_path / "missing", meta(demo))
    assert registry.versions() == []
    assert not [p.name for p in (tmp_path / "adapters").iterdir() if p.name.startswith(".tmp-")]
    assert registry.publish(demo.saved, meta(demo)) == "v1"  # failed attempts used no number


# ---------------------------------------------------------------- SIGKILL while publishing

CHILD = textwrap.dedent("""
    import json, sys
    from chatapp.learning.registry import Registry
    registry = Registry(sys.argv[1])
    if sys.argv[2] == "publish":
        print(registry.publish(sys.argv[3], json.loads(sys.argv[4]), activate=True))
    else:
        registry.delete(sys.argv[3])
""")


def run_child(crash_at, *args):
    env = subprocess_env(**({"CHATAPP_CRASH_AT": crash_at} if crash_at else {}))
    return subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def leftovers(root):
    return sorted(p.name for p in root.iterdir() if p.name.startswith((".tmp-", ".trash-")))


def check_after_crash(demo, root, *, active, versions, next_version):
    registry = Registry(root)  # opens fine and cleans up
    assert leftovers(root) == []
    assert registry.active() == active
    assert registry.versions() == versions == [r["version"] for r in registry.list()]
    assert not [r for r in registry.list() if "error" in r]
    for version in versions:
        registry.validate(version, demo.fingerprint)
    loaded = load_with_peft(demo, registry.validate(active, demo.fingerprint))
    assert torch.allclose(logits_of(loaded, demo.inputs), demo.logits, atol=1e-5)
    assert registry.publish(demo.saved, meta(demo)) == next_version
    registry.validate(next_version, demo.fingerprint)


@pytest.mark.parametrize("point, leftover, committed", [
    ("after-weights", ".tmp-publish-v2-", False),
    ("after-metadata", ".tmp-publish-v2-", False),
    ("before-rename", ".tmp-publish-v2-", False),
    ("after-rename", None, True),
    ("before-active-replace", ".tmp-ACTIVE-", True),
    (None, None, True),  # the same child, not killed: it activates v2
])
def test_sigkill_while_publishing_leaves_a_usable_registry(demo, tmp_path, point, leftover, committed):
    root = tmp_path / "adapters"
    Registry(root).publish(demo.saved, meta(demo), activate=True)
    result = run_child(point, root, "publish", demo.saved, json.dumps(meta(demo, parent="v1")))
    if point is None:
        assert result.returncode == 0 and result.stdout.strip() == "v2", result.stderr
    else:
        assert result.returncode == -signal.SIGKILL, result.stderr
        found = leftovers(root)
        assert (found == []) if leftover is None else (len(found) == 1 and found[0].startswith(leftover)), found
    check_after_crash(demo, root, active="v2" if point is None else "v1",
                      versions=["v1", "v2"] if committed else ["v1"], next_version="v3" if committed else "v2")


def test_sigkill_while_deleting_leaves_no_half_deleted_version(demo, tmp_path):
    root = tmp_path / "adapters"
    registry = Registry(root)
    registry.publish(demo.saved, meta(demo), activate=True)
    registry.publish(demo.saved, meta(demo))
    result = run_child("after-trash", root, "delete", "v2")
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert [n[:10] for n in leftovers(root)] == [".trash-v2-"]
    check_after_crash(demo, root, active="v1", versions=["v1"], next_version="v3")


def test_cleanup_on_open_spares_a_publish_in_progress(tmp_path):
    """Another process holds the lock (as while publishing): opening does not touch its temp folder."""
    root = tmp_path / "adapters"
    (root / ".tmp-publish-v1-live").mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import fcntl, os, sys, time
        fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("locked", flush=True)
        time.sleep(60)
    """), str(root / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        Registry(root)
        assert time.monotonic() - started < 1  # does not wait for the lock either
        assert leftovers(root) == [".tmp-publish-v1-live"]
    finally:
        holder.kill()
        holder.wait()
    Registry(root)
    assert leftovers(root) == []


# ---------------------------------------------------------------- command line

def cli(capsys, *argv):
    parser = argparse.ArgumentParser(prog="python -m chatapp")
    adapters_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    code = adapters_cli.run(parser.parse_args(["adapters", *map(str, argv)]))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_lists_shows_and_switches_versions(demo, tmp_path, capsys):
    data = tmp_path / "data"
    d = ("--data-dir", data)
    code, out, err = cli(capsys, "list", *d)
    assert code == 0 and out == "" and "no adapters" in err
    registry = Registry.for_data_dir(data)
    assert registry.root == (data / "adapters").resolve()
    registry.publish(demo.saved, meta(demo))
    registry.publish(demo.saved, meta(demo, parent="v1", method="kto-lora",
                                       gate={"decision": "rejected", "reason": "auc 0.5"}))

    code, out, err = cli(capsys, "list", *d)
    lines = out.splitlines()
    assert code == 0 and err == ""
    assert lines[0].split()[:4] == ["version", "created", "(UTC)", "method"]
    assert lines[1].split()[0] == "v1" and "sft-lora" in lines[1] and "promoted" in lines[1]
    assert "auc=0.97" in lines[1] and "accuracy=0.99" in lines[1]
    assert lines[2].split()[0] == "v2" and "rejected" in lines[2] and " v1 " in lines[2]
    assert "base model" in lines[3]

    assert cli(capsys, "activate", "1", "--reason", "looks good", *d)[:2] == (0, "active: v1 (was base model (no adapter))\n")
    code, out, _ = cli(capsys, "list", *d)
    assert out.splitlines()[1].startswith("* v1")
    code, out, _ = cli(capsys, "list", "--json", *d)
    listed = json.loads(out)
    assert listed["active"] == "v1" and [v["version"] for v in listed["versions"]] == ["v1", "v2"]
    code, out, _ = cli(capsys, "show", "v1", *d)
    shown = json.loads(out)
    assert shown["active"] and shown["activations"][0]["reason"] == "looks good"

    code, _, err = cli(capsys, "activate", "v2", *d)
    assert code == 2 and err.startswith("error: ") and "--force" in err and len(err.splitlines()) == 1
    assert cli(capsys, "activate", "v2", "--force", *d)[:2] == (0, "active: v2 (was v1)\n")
    assert cli(capsys, "rollback", *d)[:2] == (0, "active: v1 (rolled back from v2)\n")
    assert cli(capsys, "deactivate", *d)[:2] == (0, "active: base model (no adapter) (was v1)\n")
    assert cli(capsys, "delete", "v2", *d)[:2] == (0, "deleted v2\n")
    assert registry.versions() == ["v1"] and registry.active() is None


@pytest.mark.parametrize("argv, message", [
    (["show", "v7"], "no adapter v7"),
    (["activate", "latest"], "not an adapter version"),
    (["delete", "3"], "no adapter v3"),
    (["rollback"], "nothing to roll back"),
])
def test_cli_mistakes_exit_2_with_one_line(tmp_path, capsys, argv, message):
    code, out, err = cli(capsys, *argv, "--data-dir", tmp_path / "data")
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1


def test_cli_refuses_to_delete_the_active_version(demo, tmp_path, capsys):
    registry = Registry.for_data_dir(tmp_path / "data")
    registry.publish(demo.saved, meta(demo), activate=True)
    code, _, err = cli(capsys, "delete", "v1", "--data-dir", tmp_path / "data")
    assert code == 2 and "active adapter" in err and registry.versions() == ["v1"]
