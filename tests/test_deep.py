"""Deep RLHF problems (issue 5): the language forms, the implicit term, end-to-end runs, resume."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bilevel_dsl import BrlError, compile_file, compile_source, lower
from solvers import REGISTRY, ProblemFeatures
from solvers.deep.preferences import (
    Fragments,
    Oracle,
    PreferenceQueue,
    bradley_terry,
    fragment_returns,
    preference_accuracy,
)
from solvers.deep.reward_model import RewardNetSpec, build_reward_net
from solvers.deep.sobirl_sac import RewardModel, reward_terms

ROOT = Path(__file__).resolve().parent.parent
SIX = ["beamrider", "seaquest", "spaceinvaders", "halfcheetah", "walker2d", "hopper"]

TINY = """brl 1
problem tiny_pendulum "RLHF on Pendulum, small enough for a test"
seed 3
mdp env = gym("Pendulum-v1", discount = 0.9)
var r = reward_net(env, hidden = [16], lr = 1e-3, batch = 8)
lower env {
    temperature = auto
    reward[s, a] = r[s, a]
}
upper minimize preference_loss(env, policy, truth = env.reward, fragment = 10,
                               initial_pairs = 6, pairs = 2, queue = 50, warmup_epochs = 2)
solve sobirl_sac(outer = 4, sac_steps = 60, learning_starts = 40, sac_batch = 16,
                 sac_width = 16, implicit_warmup = 0, eval_every = 2, eval_episodes = 1,
                 checkpoint_every = 2)
"""


@pytest.mark.parametrize("name", SIX)
def test_the_six_problem_files_lower_to_deep_problems(name):
    problem = lower(compile_file(ROOT / "problems" / f"rlhf_{name}.brl"), device="cpu")
    atari = name in ("beamrider", "seaquest", "spaceinvaders")
    assert problem.env.atari == atari
    assert problem.reward_net.kind == ("atari_cnn" if atari else "mlp")
    assert problem.temperature is None and problem.preferences.fragment == 25
    assert REGISTRY.auto(ProblemFeatures.of(problem)).name == "sobirl_sac"


ATARI = 'mdp env = gym("ALE/Pong-v5"{gym})\nvar r = reward_net(env{net})\n'


@pytest.mark.parametrize("gym, net, code, said", [
    (", screen = 30", "", "E305", "from 36 to 256 (SAC's image encoder"),
    (", screen = 48", "", "E305", "reads frames of at least 49 x 49, and `env` has screen = 48"),
    (", screen = 48", ", kind = mlp", None, None),  # SAC's encoder alone: 36 and up
    (", screen = 49, grey = false", "", None, None),  # colour frames: three channels each
])
def test_atari_frames_too_small_for_a_network_are_refused_at_check(gym, net, code, said):
    source = "brl 1\n" + ATARI.format(gym=gym, net=net)
    if code is None:
        compile_source(source, "ok.brl")
        return
    with pytest.raises(BrlError) as info:
        compile_source(source, "bad.brl")
    assert info.value.diagnostics[0].code == code and said in info.value.diagnostics[0].message


def test_colour_frames_and_pixels_reach_the_networks_scaled():
    """A colour stack (stack, H, W, 3) is 3 x stack channels for both image networks, and an
    MLP on pixels sees them in [0, 1] as the CNNs do (raw bytes made its gradients 1e5)."""
    from gymnasium import spaces

    from solvers.deep.networks import NatureEncoder, channels_first, make_encoder

    frames = torch.randint(0, 256, (5, 2, 52, 52, 3), dtype=torch.uint8)
    space = spaces.Box(0, 255, (2, 52, 52, 3), dtype="uint8")
    encoder = make_encoder(space)
    assert isinstance(encoder, NatureEncoder) and encoder(frames).shape == (5, 512)
    cnn = build_reward_net(RewardNetSpec(kind="atari_cnn"), (2, 52, 52, 3), 6, None).eval()
    assert cnn(frames, torch.zeros(5, dtype=torch.long)).shape == (5,)
    # the channels are the frames' colours in order: frame 0's red, green, blue, frame 1's...
    assert torch.equal(channels_first(frames)[:, 4], frames[:, 1, :, :, 1])
    torch.manual_seed(0)
    mlp = build_reward_net(RewardNetSpec(hidden=(4,)), (2, 52, 52, 3), 6, None)
    first = mlp.features(frames)  # the hidden layer's input is the flat frames, scaled
    assert first.shape == (5, 4)
    assert torch.allclose(first, mlp.body[1][:-1](frames.flatten(1).float() / 255.0))


@pytest.mark.parametrize("text, code, where", [
    ('mdp env = gym("HalfCheetah-v9")', "E406", '"HalfCheetah-v9"'),
    ('mdp env = gym("os:system")', "E406", '"os:system"'),
    ('mdp env = gym("HalfCheetah-v5", frame_skip = 4)', "E404", "frame_skip = 4"),
    ('mdp env = gym("HalfCheetah-v5", discount = 1)', "E402", "1"),
])
def test_gym_declaration_errors_are_located(text, code, where):
    source = f"brl 1\n{text}\n"
    with pytest.raises(BrlError) as info:
        compile_source(source, "bad.brl")
    diag = info.value.diagnostics[0]
    assert diag.code == code
    line = source.split("\n")[diag.span.line - 1]
    assert line[diag.span.column - 1:].startswith(where)


def test_options_that_clash_are_refused_at_check_where_written():
    from bilevel_dsl.cli import solver_catalog

    text = TINY.replace("sac_steps = 60", "sac_steps = 61, envs = 2")
    with pytest.raises(BrlError) as info:
        compile_source(text, "bad.brl", solver_catalog=solver_catalog)
    diag = info.value.diagnostics[0]
    assert diag.code == "E805" and diag.message.startswith("sac_steps (61) must be a multiple")
    assert text.split("\n")[diag.span.line - 1][diag.span.column - 1:].startswith("61")
    held = TINY.replace("warmup_epochs = 2", "warmup_epochs = 2, heldout_every = 1")
    with pytest.raises(BrlError) as info:
        compile_source(held, "bad.brl")
    assert "would never be trained" in info.value.diagnostics[0].message
    # a whole number written as a real one is an integer option's value
    compile_source(TINY.replace("sac_steps = 60", "sac_steps = 6e1"), "ok.brl",
                   solver_catalog=solver_catalog)


def test_deep_lower_and_upper_errors():
    base = TINY.split("lower env")[0]
    bad_temperature = base + "lower env { temperature = -1   reward[s, a] = r[s, a] }\n"
    with pytest.raises(BrlError) as info:
        compile_source(bad_temperature, "bad.brl")
    assert info.value.diagnostics[0].code == "E403"
    bad_reward = base + "lower env { temperature = auto   reward[s, a] = 1 }\n"
    with pytest.raises(BrlError) as info:
        compile_source(bad_reward, "bad.brl")
    assert "reward network" in info.value.diagnostics[0].message
    bad_upper = base + ("lower env { temperature = auto   reward[s, a] = r[s, a] }\n"
                        "upper minimize entropy(policy)\n")
    with pytest.raises(BrlError) as info:
        compile_source(bad_upper, "bad.brl")
    assert info.value.diagnostics[0].code == "E502"


def test_implicit_term_matches_the_score_function_of_a_softmax_follower():
    """With pi = softmax(r'(s, .) / alpha) for SAC's standardised r' = (r_theta - shift) / scale
    (the one-step soft-optimal policy), the term's gradient is stopgrad(BCE) * sum_t
    grad log pi(a_t | s_t), computed here by autograd."""
    torch.manual_seed(0)
    n_obs, n_actions, length, alpha, shift, scale = 5, 3, 4, 0.7, 0.3, 2.5
    spec = RewardNetSpec(hidden=(8,), activation="tanh")
    net = build_reward_net(spec, (n_obs,), n_actions, None)
    model = RewardModel.__new__(RewardModel)  # only its network and standardisation are used
    model.net, model.shift, model.scale = net, torch.tensor(shift), torch.tensor(scale)

    class SoftmaxFollower:
        def __init__(self) -> None:
            self.alpha = torch.tensor(alpha)

        def action_probs(self, obs):
            return torch.softmax((net.body(obs) - shift) / scale / alpha, -1).detach()

    def fragments(seed):
        g = torch.Generator().manual_seed(seed)
        return Fragments(torch.randn(6, length, n_obs, generator=g, dtype=torch.float32),
                         torch.randint(0, n_actions, (6, length), generator=g),
                         torch.randn(6, length, generator=g, dtype=torch.float32))

    first, second = fragments(1), fragments(2)
    labels = torch.tensor([1.0, 0.0, 1.0, 0.5, 0.0, 1.0])
    bce = bradley_terry(fragment_returns(net, first), fragment_returns(net, second),
                        labels).detach()
    follower = SoftmaxFollower()
    ours = (bce * (reward_terms(model, follower, first, "public", 0.9, 1)[1]
                   + reward_terms(model, follower, second, "public", 0.9, 1)[1])).mean()
    grad_ours = torch.autograd.grad(ours, list(net.parameters()))

    def log_pi(frags):
        logits = (net.body(frags.obs.reshape(-1, n_obs)) - shift) / scale / alpha
        taken = torch.log_softmax(logits, -1).gather(-1, frags.actions.reshape(-1, 1))
        return taken.view(6, length).sum(-1)

    reference = (bce * (log_pi(first) + log_pi(second))).mean()
    grad_reference = torch.autograd.grad(reference, list(net.parameters()))
    for a, b in zip(grad_ours, grad_reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_oracle_and_queue():
    g = torch.Generator().manual_seed(0)
    frags = Fragments(torch.zeros(4, 2, 1), torch.zeros(4, 2, 1),
                      torch.tensor([[1.0, 1.0], [0.0, 0.0], [2.0, -1.0], [1.0, 0.0]]))
    first = Fragments(frags.obs[:2], frags.actions[:2], frags.rewards[:2])
    second = Fragments(frags.obs[2:], frags.actions[2:], frags.rewards[2:])
    labels = Oracle().label(first, second, g)
    assert labels.tolist() == [1.0, 0.0]  # returns 2 vs 1, 0 vs 1
    clipped = Oracle(clip=True).label(first, second, g)
    assert clipped.tolist() == [1.0, 0.0]  # signs: 2 vs 0, 0 vs 1
    queue = PreferenceQueue(capacity=3)
    for _ in range(2):
        queue.push(first, second, labels, Oracle())
    assert len(queue) == 3 and queue.labels.tolist() == [0.0, 1.0, 0.0]


def test_held_out_accuracy_leaves_tied_pairs_out():
    """Pairs whose true returns tie say nothing of the model: counted as agreement, an
    untrained network scored 1.0 on CartPole, where every fragment ties."""
    torch.manual_seed(0)
    net = build_reward_net(RewardNetSpec(hidden=(4,)), (1,), None, 1)
    obs = torch.randn(3, 2, 1)
    first = Fragments(obs, torch.zeros(3, 2, 1), torch.tensor([[1.0, 1.0], [2.0, 0.0],
                                                                [0.0, 0.0]]))
    second = Fragments(-obs, torch.zeros(3, 2, 1), torch.tensor([[1.0, 1.0], [0.0, 1.0],
                                                                  [1.0, 0.0]]))
    queue = PreferenceQueue(capacity=10)
    queue.push(first, second, torch.zeros(3), Oracle())
    with torch.no_grad():
        predicted = fragment_returns(net, first) - fragment_returns(net, second)
    right = [(predicted[1] > 0).item(), (predicted[2] < 0).item()]  # the first pair ties
    assert preference_accuracy(net, queue) == (sum(right) / 2, 2)
    ties = PreferenceQueue(capacity=10)
    ties.push(_slice_fragments(first, 0), _slice_fragments(second, 0), torch.zeros(1), Oracle())
    accuracy, counted = preference_accuracy(net, ties)
    assert math.isnan(accuracy) and counted == 0


def _slice_fragments(frags: Fragments, k: int) -> Fragments:
    return Fragments(frags.obs[k:k + 1], frags.actions[k:k + 1], frags.rewards[k:k + 1])


def _brl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bilevel_dsl.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


HALFCHEETAH = ["--set", "outer=2", "--set", "sac_steps=40", "--set", "learning_starts=30",
               "--set", "sac_batch=16", "--set", "sac_width=32", "--set", "implicit_warmup=0",
               "--set", "eval_every=2", "--set", "eval_episodes=1", "-D", "initial_pairs=3",
               "-D", "warmup_epochs=1"]
BEAMRIDER = ["--set", "outer=2", "--set", "sac_steps=32", "--set", "learning_starts=16",
             "--set", "sac_batch=8", "--set", "implicit_warmup=0", "--set", "eval_every=0",
             "-D", "initial_pairs=2", "-D", "warmup_epochs=1"]
CRITIC = ["--set", "implicit=critic", "--set", "critic_updates=4"]


@pytest.mark.parametrize("name, options", [
    ("halfcheetah", HALFCHEETAH), ("beamrider", BEAMRIDER),
    ("halfcheetah", HALFCHEETAH + CRITIC), ("beamrider", BEAMRIDER + CRITIC),
], ids=["halfcheetah", "beamrider", "halfcheetah-critic", "beamrider-critic"])
def test_a_tiny_end_to_end_run(tmp_path, name, options):
    out = tmp_path / "run"
    done = _brl("solve", str(ROOT / "problems" / f"rlhf_{name}.brl"), "--quiet", "--out",
                str(out), *options, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    record = json.loads((out / "result.json").read_text())
    assert record["iterations"] == 2 and record["solver"]["name"] == "sobirl_sac"
    assert record["queries"] > 0 and record["env_steps"] >= 64
    assert (out / "curve.png").stat().st_size > 0
    critic_errors = record["history"]["critic_td_error"]
    assert len(critic_errors) == 2
    if "implicit=critic" in options:
        assert all(math.isfinite(e) and e >= 0 for e in critic_errors)
    else:
        assert critic_errors == [None, None]  # NaN, written as JSON null
    state = torch.load(out / "reward_net.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


# implicit = critic, and a decaying query schedule whose carry the checkpoint must keep: pairs
# 3 at T = 0, then 3 * 100 / 160 = 1.875 -> 1, 1.364 + 0.875 -> 2, 1.071 + 0.239 -> 1.
CRITIC_DECAY = TINY.replace("pairs = 2,", "pairs = 3, schedule = decay, decay_steps = 100,") \
    .replace("checkpoint_every = 2)", "checkpoint_every = 2, implicit = critic, "
             "critic_updates = 10)")


@pytest.mark.parametrize("text, queries", [(TINY, [8, 10, 12, 14]),
                                           (CRITIC_DECAY, [9, 10, 12, 13])],
                         ids=["public", "critic-decay"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, text, queries):
    source = tmp_path / "tiny.brl"
    source.write_text(text)
    whole = _brl("solve", str(source), "--quiet", "--out", str(tmp_path / "whole"),
                 cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    half = _brl("solve", str(source), "--quiet", "--out", str(tmp_path / "half"),
                "--set", "outer=2", cwd=tmp_path)
    assert half.returncode == 0, half.stderr
    # a resumed run keeps the options it was saved with (outer = 2 here) unless told
    resumed = _brl("solve", str(source), "--quiet", "--resume", str(tmp_path / "half"),
                   "--set", "outer=4", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp_path / "whole" / "reward_net.pt", weights_only=True)
    b = torch.load(tmp_path / "half" / "reward_net.pt", weights_only=True)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    history_a = json.loads((tmp_path / "whole" / "result.json").read_text())["history"]
    history_b = json.loads((tmp_path / "half" / "result.json").read_text())["history"]
    assert history_a["objective"] == history_b["objective"]
    assert history_a["eval_return"] == history_b["eval_return"]
    assert history_a["queries"] == history_b["queries"] == queries


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    source = tmp_path / "tiny.brl"
    source.write_text(TINY)
    done = _brl("solve", str(source), "--resume", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 1 and "no checkpoint there" in done.stderr
    assert "Traceback" not in done.stderr
    missing = tmp_path / "never_ran"  # said so, and not created
    done = _brl("solve", str(source), "--resume", str(missing), cwd=tmp_path)
    assert done.returncode == 1 and "no such folder" in done.stderr and not missing.exists()
    # --out beside --resume would be ignored (the run continues in place): refused
    done = _brl("solve", str(source), "--resume", str(tmp_path), "--out",
                str(tmp_path / "copy"), cwd=tmp_path)
    assert done.returncode == 1 and "would be ignored" in done.stderr
    # --force (replace the folder) beside --resume (continue it) was silently ignored
    done = _brl("solve", str(source), "--resume", str(tmp_path), "--force", cwd=tmp_path)
    assert done.returncode == 1 and "--force would replace it" in done.stderr


def test_atari_evaluation_env_matches_the_training_copies():
    """Evaluation builds one environment; for Atari it is ale_py's vector env with one copy, so
    observations have exactly the training copies' preprocessing (no cv2 needed)."""
    from solvers.deep.envs import EnvSpec, make_env, make_vector_env

    spec = EnvSpec("ALE/Pong-v5")
    one, many = make_env(spec), make_vector_env(spec, 2, seed=0)
    obs, _ = one.reset(seed=5)
    assert obs.shape == many.single_observation_space.shape == (4, 84, 84)
    assert obs.dtype == many.single_observation_space.dtype
    obs, reward, terminated, truncated, _ = one.step(0)
    assert obs.shape == (4, 84, 84) and isinstance(reward, float)
    assert isinstance(terminated, bool) and isinstance(truncated, bool)
    one.close()
    many.close()


def test_mujoco_warnings_leave_no_log_file_in_the_working_directory(tmp_path):
    """HalfCheetah's model warns of a deprecated attribute whenever it is built; MuJoCo's own
    handler printed it and wrote MUJOCO_LOG.TXT into the user's directory. It is a Python
    warning now, shown once for two copies. (A subprocess: the handler is process-wide.)"""
    script = ("import warnings\n"
              "from solvers.deep.envs import EnvSpec, make_vector_env\n"
              "with warnings.catch_warnings(record=True) as seen:\n"
              "    warnings.simplefilter('default')\n"
              "    make_vector_env(EnvSpec('HalfCheetah-v5'), 2, seed=0).close()\n"
              "print(sum('MuJoCo: ' in str(w.message) for w in seen))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()
    assert done.stdout.strip() == "1" and "WARNING" not in done.stdout + done.stderr
