"""TD(lambda) value training: it fits, it resumes from a checkpoint after a kill, rollouts feed it."""

import numpy as np
import pandas as pd
import pytest
import torch

from models.data.rollouts import reward_stats, training_rollouts
from models.value.value_model import ValueModel
from models.value.value_training import (
    Rollouts,
    ValueTrainConfig,
    backward_step,
    batch_indices,
    calibrated_targets,
    make_batch,
    micro_batches,
    split_by_group,
    train_value_model,
)

VOCAB = 32


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tiny_gpt2):
    path = tmp_path_factory.mktemp("base")
    tiny_gpt2(VOCAB, n_layer=1, n_positions=32, dropout=True).save_pretrained(path)
    return path


def signal_rollouts(n: int = 96, seed: int = 0) -> Rollouts:
    """The reward is +1 when the first completion token is 5 and -1 when it is 6: a value model
    can read the outcome off the prefix from the first action on."""
    rng = np.random.default_rng(seed)
    prompts, actions, rewards, groups = [], [], [], []
    for i in range(n):
        first = 5 if i % 2 else 6
        rest = rng.integers(10, VOCAB, size=rng.integers(2, 6)).tolist()
        prompts.append([0, 2 + i % 3])
        actions.append([first] + rest)
        rewards.append(1.0 if first == 5 else -1.0)
        groups.append(f"p{i // 4}")
    return Rollouts(prompts, actions, rewards, groups)


CONFIG = dict(train_steps=40, batch_size=16, learning_rate=3e-3, eval_fraction=0.25, checkpoint_every=10,
              prefix_lengths=(1, 2))


@pytest.mark.parametrize("parameterization", ["scalar", "qhead", "distributional", "distributional_qhead"])
def test_td_training_learns_values_that_predict_the_reward(base_dir, parameterization):
    config = ValueTrainConfig(parameterization=parameterization, **CONFIG)
    model, metrics = train_value_model(signal_rollouts(), base_dir, config, pad_id=1, device="cpu")
    assert metrics["loss_curve"][-1] < metrics["loss_curve"][0]
    assert metrics["corr_prefix_1"] > 0.9          # held-out prompts: the first token decides the reward
    assert metrics["n_eval_rollouts"] > 0 and metrics["device"] == "cpu"
    assert not model.training


def gamble_rollouts(n: int = 128, seed: int = 0) -> Rollouts:
    """First token 5: a gamble, reward +1.5 or -1.5 at random; first token 6: a sure 0.5. The mean
    prefers 6, the soft value at beta 3 (the tilt's) prefers the gamble."""
    rng = np.random.default_rng(seed)
    prompts, actions, rewards, groups = [], [], [], []
    for i in range(n):
        first = 5 if i % 2 else 6
        actions.append([first] + rng.integers(10, VOCAB, size=2).tolist())
        prompts.append([0, 2])
        rewards.append(float(rng.choice([-1.5, 1.5])) if first == 5 else 0.5)
        groups.append(f"p{i // 4}")
    return Rollouts(prompts, actions, rewards, groups)


@pytest.mark.parametrize("calibrated_bins", [True, False])
@pytest.mark.parametrize("parameterization", ["distributional", "distributional_qhead"])
def test_distributional_training_learns_the_spread_the_soft_value_needs(base_dir, parameterization, calibrated_bins):
    config = ValueTrainConfig(parameterization=parameterization, calibrated_bins=calibrated_bins,
                              **{**CONFIG, "train_steps": 60})
    model, _ = train_value_model(gamble_rollouts(), base_dir, config, pad_id=1, device="cpu")
    state = model.start(torch.tensor([[0, 2]]), torch.ones(1, 2, dtype=torch.long))
    candidates = torch.tensor([[5, 6]])
    mean = model.candidate_q(state, candidates)[0]
    soft = model.candidate_q(state, candidates, beta=3.0)[0]
    assert float(mean[1]) > float(mean[0])            # E[R]: 0.5 beats 0
    assert float(soft[0]) > float(soft[1])            # (1/3) log E exp(3R) = 1.5 - log(2)/3 ~ 1.27 beats 0.5
    assert abs(float(mean[0])) < 0.3 and abs(float(mean[1]) - 0.5) < 0.3


def test_distributional_training_needs_gamma_one(base_dir):
    config = ValueTrainConfig(parameterization="distributional", gamma=0.9, **CONFIG)
    with pytest.raises(ValueError, match="gamma = 1"):
        train_value_model(signal_rollouts(), base_dir, config, pad_id=1, device="cpu")


def test_killed_training_resumes_from_checkpoint_to_the_same_weights(base_dir, tmp_path):
    data = signal_rollouts()
    config = ValueTrainConfig(parameterization="scalar", **CONFIG)
    reference, _ = train_value_model(data, base_dir, config, pad_id=1, device="cpu")

    class Killed(Exception):
        pass

    def kill_after_step_25(message: str):
        if message.startswith("value step 28/"):
            raise Killed()

    ckpt = tmp_path / "ckpt"
    with pytest.raises(Killed):
        train_value_model(data, base_dir, ValueTrainConfig(parameterization="scalar", **{**CONFIG, "train_steps": 40}), pad_id=1,
                          device="cpu", checkpoint_dir=ckpt, progress=kill_after_step_25)
    assert (ckpt / "progress.json").exists()
    resumed, metrics = train_value_model(data, base_dir, config, pad_id=1, device="cpu", checkpoint_dir=ckpt)
    assert metrics["resumed_from_step"] == 20       # last checkpoint before the kill
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    # A checkpoint of other data is not resumed from.
    other = signal_rollouts(seed=1)
    _, fresh = train_value_model(other, base_dir, config, pad_id=1, device="cpu", checkpoint_dir=ckpt)
    assert fresh["resumed_from_step"] == 0


def test_micro_batches_partition_the_step_by_length():
    data = signal_rollouts()
    index = batch_indices(len(data), 16, step=3, seed=0)
    chunks = micro_batches(data, index, 5)
    assert sorted(sum(chunks, [])) == sorted(index) and [len(c) for c in chunks] == [5, 5, 5, 1]
    lengths = [len(data.prompt_ids[i]) + len(data.action_ids[i]) for i in sum(chunks, [])]
    assert lengths == sorted(lengths)
    assert micro_batches(data, index, 0) == [sum(chunks, [])]      # 0: one micro-batch, the whole step


@pytest.mark.parametrize("parameterization", ["scalar", "distributional_qhead"])
def test_micro_batches_give_the_whole_batch_gradient(base_dir, parameterization):
    """Each micro-batch's mean loss weighted by its share of the step's actions: the loss and the
    gradient of one forward over the whole padded batch, up to float rounding."""
    data = signal_rollouts()
    support, fitted = calibrated_targets(data, ValueTrainConfig(), None)
    model = ValueModel.from_base(base_dir, parameterization=parameterization, support=support, rank=4).train()
    with torch.no_grad():                           # a head that is not zero, so every gradient flows
        for p in model.head.parameters():
            p.normal_(0, 0.1)
    index = batch_indices(len(fitted), 16, step=0, seed=0)
    found = {}
    for size in (0, 3):
        model.zero_grad()
        config = ValueTrainConfig(parameterization=parameterization, micro_batch_size=size)
        loss, tokens = backward_step(model, fitted, index, 1, config, torch.device("cpu"))
        found[size] = loss, tokens, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert found[0][0] == pytest.approx(found[3][0], rel=1e-5) and found[0][1] == found[3][1]
    assert found[0][2].keys() == found[3][2].keys() and len(found[0][2]) > 4
    for name, grad in found[0][2].items():
        torch.testing.assert_close(found[3][2][name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_batches_are_a_pure_function_of_step():
    assert batch_indices(50, 8, 7, seed=3) == batch_indices(50, 8, 7, seed=3)
    epoch0 = sum((batch_indices(48, 8, s, seed=3) for s in range(6)), [])
    assert sorted(epoch0) == list(range(48))          # one epoch visits every row once


def test_split_keeps_prompts_on_one_side():
    data = signal_rollouts()
    train, held = split_by_group(data, 0.25, seed=0)
    assert set(train).isdisjoint(held) and len(train) + len(held) == len(data)
    assert {data.groups[i] for i in train}.isdisjoint({data.groups[i] for i in held})


def test_make_batch_masks_actions_only():
    data = Rollouts([[0, 2], [0]], [[5, 6, 7], [8]], [1.0, -1.0], ["a", "b"])
    ids, attention, actions, rewards = make_batch(data, [0, 1], pad_id=1)
    assert ids.tolist() == [[0, 2, 5, 6, 7], [0, 8, 1, 1, 1]]
    assert attention.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert actions.tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]
    assert rewards.tolist() == [1.0, -1.0]


def test_training_rollouts_append_eos_when_finished_and_standardize():
    df = pd.DataFrame({"prompt_id": ["a", "b"], "prompt_ids": [np.array([0, 3]), np.array([0, 4])],
                       "completion_ids": [np.array([7, 8]), np.array([9])], "finished": [True, False],
                       "learned_positivity": [2.0, 0.0]})
    stats = reward_stats(df, "learned_positivity")
    assert stats == {"mean": 1.0, "std": 1.0}
    data = training_rollouts(df, "learned_positivity", eos_id=0, stats=stats)
    assert data.action_ids == [[7, 8, 0], [9]]
    assert data.rewards == [1.0, -1.0]
    assert data.prompt_ids == [[0, 3], [0, 4]] and data.groups == ["a", "b"]


def test_support_pads_the_reward_range_so_edge_rewards_keep_their_spread():
    from models.value.distributional import Support, hl_gauss, soft_value
    from models.value.value_training import support_for

    data = Rollouts([[0]] * 3, [[5]] * 3, [-1.0, 0.2, 1.5], ["a", "b", "c"])
    support = support_for(data, ValueTrainConfig(n_bins=41))
    pad = 3 * Support.sigma_ratio * support.width
    assert support.v_min == pytest.approx(-1.0 - pad) and support.v_max == pytest.approx(1.5 + pad)
    assert support.width == pytest.approx(2.5 / (41 - 4.5))
    # Every reward's histogram is a whole Gaussian: the soft value's offset above the reward is the
    # same at the edges as in the middle (so centring over candidates removes it).
    hist = hl_gauss(torch.tensor([-1.0, 0.2, 1.5]), support)
    offsets = soft_value(hist.log(), support, 16.0) - torch.tensor([-1.0, 0.2, 1.5])
    assert float(offsets.max() - offsets.min()) < 0.01
    # Explicit bounds win.
    assert support_for(data, ValueTrainConfig(v_min=-4.0, v_max=4.0)).v_min == -4.0


def test_calibrated_bins_fit_normal_scores_and_survive_a_save(base_dir, tmp_path):
    from models.value.distributional import normal_scores
    from models.value.value_model import ValueModel

    # Rewards of +-3: their normal scores are +-0.674, so the two units cannot be mistaken.
    signal = signal_rollouts()
    data = Rollouts(signal.prompt_ids, signal.action_ids, [3.0 * r for r in signal.rewards], signal.groups)
    config = ValueTrainConfig(parameterization="distributional_qhead", **CONFIG)
    model, metrics = train_value_model(data, base_dir, config, pad_id=1, device="cpu")
    support = model.support
    assert support.calibrated and len(support.bin_values) == config.n_bins
    # The bins span the normal scores of the rewards; each bin maps back to a reward in their range.
    z = normal_scores(data.rewards)
    assert support.v_min < z.min() and support.v_max > z.max()
    assert min(support.bin_values) == -3.0 and max(support.bin_values) == 3.0
    assert support.normal_scores_of([-3.0, 3.0, 0.0]).tolist() == pytest.approx([-0.6744898, 0.6744898, 0.0])
    assert metrics["corr_prefix_1"] > 0.9
    state = model.start(torch.tensor([[0, 2]]), torch.ones(1, 2, dtype=torch.long))
    candidates = torch.tensor([[5, 6]])
    reward_units = model.candidate_q(state, candidates)[0]
    quantile_units = model.candidate_q(state, candidates, calibrated=True)[0]
    assert float(reward_units[0]) > 2.0 and float(reward_units[1]) < -2.0          # rewards: +-3
    assert 0.4 < float(quantile_units[0]) < 1.0 and -1.0 < float(quantile_units[1]) < -0.4   # scores: +-0.674
    model.save(tmp_path / "vm")
    loaded = ValueModel.load(tmp_path / "vm")
    assert loaded.support == support
    torch.testing.assert_close(loaded.candidate_q(loaded.start(torch.tensor([[0, 2]]), torch.ones(1, 2, dtype=torch.long)),
                                                  candidates, calibrated=True)[0], quantile_units)
    # Trained further on new rollouts, the model keeps its units: their rewards go through its map.
    more = ValueTrainConfig(parameterization="distributional_qhead", **{**CONFIG, "train_steps": 20})
    again, _ = train_value_model(data, base_dir, more, pad_id=1, device="cpu", init_model=loaded)
    assert again.support == support
    state = again.start(torch.tensor([[0, 2]]), torch.ones(1, 2, dtype=torch.long))
    assert 0.4 < float(again.candidate_q(state, candidates, calibrated=True)[0, 0]) < 1.0


def test_calibrated_bins_refuse_a_fixed_range_and_uniform_bins_refuse_calibrated_values(base_dir):
    config = ValueTrainConfig(parameterization="distributional", v_min=-4.0, v_max=4.0, **CONFIG)
    with pytest.raises(ValueError, match="calibrated_bins"):
        train_value_model(signal_rollouts(), base_dir, config, pad_id=1, device="cpu")
    uniform = ValueTrainConfig(parameterization="distributional", calibrated_bins=False, **{**CONFIG, "train_steps": 2})
    model, _ = train_value_model(signal_rollouts(), base_dir, uniform, pad_id=1, device="cpu")
    state = model.start(torch.tensor([[0, 2]]), torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="calibrated bins"):
        model.candidate_q(state, torch.tensor([[5, 6]]), calibrated=True)
