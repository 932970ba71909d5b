"""Distributional values: HL-Gauss histograms, soft values, distributional TD(lambda), and the
claim they exist for: decoding with exact soft values samples pi0(y)·exp(beta·R(y))/Z exactly."""

import math
import types

import pytest
import torch

from models.decoding.vas import ValueGuidance, VASConfig
from models.lm.sampling import SamplingConfig, sample
from models.value.distributional import (
    Support,
    calibrated_support,
    distributional_lambda_returns,
    hl_gauss,
    mean_value,
    normal_scores,
    soft_value,
    value_of,
)

# ---------------------------------------------------------------- soft values

@pytest.mark.parametrize("beta", [-8.0, -0.5, 1e-3, 0.5, 2.0, 8.0, 30.0])
def test_soft_value_of_a_one_bin_distribution_is_that_bin(beta):
    one_bin = Support(v_min=0.2, v_max=1.0, n_bins=1)                   # its only centre is 0.6
    assert soft_value(torch.zeros(3, 1), one_bin, beta).tolist() == pytest.approx([0.6] * 3, abs=1e-6)
    support = Support(v_min=-2.0, v_max=2.0, n_bins=8)                   # centres -1.75, -1.25, ..., 1.75
    logits = torch.full((8,), float("-inf"))
    logits[5] = 0.0                                                       # all mass on 0.75
    assert float(soft_value(logits, support, beta)) == pytest.approx(0.75, abs=1e-6)


def test_soft_value_tends_to_the_mean_as_beta_goes_to_zero_and_exceeds_it_otherwise():
    support = Support(v_min=-3.0, v_max=3.0, n_bins=13)
    logits = torch.randn(5, 13, generator=torch.Generator().manual_seed(0))
    mean = mean_value(logits, support)
    gaps = [float((soft_value(logits, support, b) - mean).abs().max()) for b in (1.0, 1e-1, 1e-2, 1e-3)]
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 2e-3
    assert torch.equal(soft_value(logits, support, 0.0), mean)
    # Jensen: (1/b) log E exp(bR) >= E R for b > 0, <= for b < 0, strictly for a spread histogram.
    assert bool((soft_value(logits, support, 2.0) > mean + 1e-3).all())
    assert bool((soft_value(logits, support, -2.0) < mean - 1e-3).all())
    # Hand-computed: mass 1/2 on -1 and +1 (bins of width 2 on [-2, 2]), beta 1: log cosh(1) = 0.4338.
    two = Support(v_min=-2.0, v_max=2.0, n_bins=2)
    assert float(soft_value(torch.zeros(2), two, 1.0)) == pytest.approx(math.log(math.cosh(1.0)), abs=1e-6)
    assert value_of(torch.zeros(2), two, None) == pytest.approx(0.0)


# ---------------------------------------------------------------- calibrated bins

def test_normal_scores_by_hand_with_ties():
    # ranks 4, 1, 2.5, 2.5, 5 of 5 -> Phi^-1(0.7), Phi^-1(0.1), Phi^-1(0.4) twice, Phi^-1(0.9)
    z = normal_scores([3.0, 1.0, 2.0, 2.0, 5.0])
    assert z.tolist() == pytest.approx([0.5244005, -1.2815516, -0.2533471, -0.2533471, 1.2815516], abs=1e-6)


def test_calibrated_bins_resolve_a_saturated_top_and_ignore_monotone_transforms():
    gen = torch.Generator().manual_seed(0)
    # A saturating reward, like the learned one: the top tenth lies within 0.03 of the ceiling.
    rewards = torch.tanh(3 * torch.randn(2000, generator=gen)).double().numpy()
    top = rewards >= float(torch.quantile(torch.from_numpy(rewards), 0.9))
    uniform = Support(v_min=float(rewards.min()), v_max=float(rewards.max()), n_bins=41)
    calibrated, z = calibrated_support(rewards, n_bins=41)
    bins_of = lambda values, s: set(((values - s.v_min) // s.width).astype(int).tolist())   # noqa: E731
    assert len(bins_of(rewards[top], uniform)) <= 2          # the top tenth in one or two uniform bins
    assert len(bins_of(z[top], calibrated)) >= 6              # and in several calibrated ones
    # Ranks are all that matter: a monotone transform of the rewards gives the same bins and scores,
    # and each bin's reward is the transform of the old one (up to the linear interpolation between samples).
    again, z_again = calibrated_support(rewards ** 3, n_bins=41)
    assert (again.v_min, again.v_max) == (calibrated.v_min, calibrated.v_max)
    assert z_again.tolist() == pytest.approx(z.tolist())
    assert again.bin_values == pytest.approx([v ** 3 for v in calibrated.bin_values], abs=1e-6)
    # A bin's mean is its reward; calibrated, its normal score.
    logits = torch.full((41,), float("-inf"))
    logits[30] = 0.0
    assert float(mean_value(logits, calibrated)) == pytest.approx(calibrated.bin_values[30], abs=1e-6)
    assert float(mean_value(logits, calibrated, calibrated=True)) == pytest.approx(float(calibrated.centers()[30]), abs=1e-6)
    assert float(soft_value(logits, calibrated, 5.0)) == pytest.approx(calibrated.bin_values[30], abs=1e-6)


def test_the_calibration_map_is_kept_at_knots_and_maps_new_rewards():
    support, z = calibrated_support([0.0, 1.0, 2.0, 2.0, 10.0], n_bins=9)
    assert support.knot_rewards == (0.0, 1.0, 2.0, 10.0)
    assert support.knot_scores == pytest.approx([z[0], z[1], z[2], z[4]])
    # Between knots linear, beyond them clamped: no quantile lies outside pi0's range.
    mapped = support.normal_scores_of([1.5, -5.0, 99.0])
    assert mapped.tolist() == pytest.approx([(z[1] + z[2]) / 2, z[0], z[4]])
    with pytest.raises(ValueError, match="no calibration map"):
        Support(v_min=-1.0, v_max=1.0, n_bins=2).normal_scores_of([0.0])
    with pytest.raises(ValueError, match="increase strictly"):
        Support(v_min=-1.0, v_max=1.0, n_bins=2, knot_rewards=(1.0, 0.0), knot_scores=(0.0, 1.0))


def test_calibrated_supports_are_checked():
    with pytest.raises(ValueError, match="one value per bin"):
        Support(v_min=-1.0, v_max=1.0, n_bins=3, bin_values=(0.0, 1.0))
    with pytest.raises(ValueError, match="non-decreasing"):
        Support(v_min=-1.0, v_max=1.0, n_bins=2, bin_values=(1.0, 0.0))
    with pytest.raises(ValueError, match="calibrated bins"):
        value_of(torch.zeros(4), Support(v_min=-1.0, v_max=1.0, n_bins=4), None, calibrated=True)


# ---------------------------------------------------------------- HL-Gauss

def test_hl_gauss_histograms_sum_to_one_and_keep_the_mean_within_half_a_bin():
    support = Support(v_min=-4.0, v_max=4.0, n_bins=41)
    values = torch.linspace(-3.9, 3.9, 157)
    hist = hl_gauss(values, support)
    assert hist.shape == (157, 41)
    assert torch.allclose(hist.sum(-1), torch.ones(157), atol=1e-5)
    assert bool((hist >= 0).all())
    assert float((mean_value(hist.log(), support) - values).abs().max()) <= support.width / 2
    # Beyond the support a value lands on the edge bins, not half outside them.
    outside = hl_gauss(torch.tensor([-9.0, 9.0]), support)
    assert float(mean_value(outside.log(), support)[0]) < -3.7 and float(mean_value(outside.log(), support)[1]) > 3.7
    # sigma = 0.75 bin widths: a value on a centre puts Phi(0.5/0.75) - Phi(-0.5/0.75) of its mass there.
    central = hl_gauss(torch.tensor([0.0]), support)[0, 20]
    phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))                # noqa: E731
    assert float(central) == pytest.approx(phi(2 / 3) - phi(-2 / 3), abs=1e-4)


# ---------------------------------------------------------------- distributional TD(lambda)

def test_distributional_lambda_returns_match_a_hand_computed_example():
    lam = 0.5
    # Row 0: actions at t = 1, 2, 3 (left padded). Row 1: actions at t = 0, 1 (right padded).
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])
    probs = torch.zeros(2, 4, 2)
    probs[0, 2] = torch.tensor([1.0, 0.0])
    probs[0, 3] = torch.tensor([0.0, 1.0])
    probs[1, 1] = torch.tensor([0.3, 0.7])
    probs[1, 2] = torch.tensor([0.9, 0.1])        # padding: must not leak into row 1's targets
    terminal = torch.tensor([[0.2, 0.8], [1.0, 0.0]])
    targets = distributional_lambda_returns(probs, terminal, mask, lam)
    # Row 0: y3 = h = [.2, .8]; y2 = .5 p3 + .5 y3 = [.1, .9]; y1 = .5 p2 + .5 y2 = [.55, .45].
    assert torch.allclose(targets[0], torch.tensor([[0, 0], [0.55, 0.45], [0.1, 0.9], [0.2, 0.8]]))
    # Row 1: y1 = h = [1, 0]; y0 = .5 p1 + .5 y1 = [.65, .35].
    assert torch.allclose(targets[1], torch.tensor([[0.65, 0.35], [1.0, 0.0], [0, 0], [0, 0]]))
    # lambda = 1 is Monte Carlo: every step's target is the reward's histogram.
    mc = distributional_lambda_returns(probs, terminal, mask, 1.0)
    assert mc[0, 1].tolist() == pytest.approx([0.2, 0.8]) and mc[1, 0].tolist() == pytest.approx([1.0, 0.0])


# ---------------------------------------------------------------- exact tilt on a tiny tree

EOS, PROMPT_TOKEN = 3, 4          # actions are tokens 0, 1, 2; EOS and the prompt word are never sampled
SUPPORT = Support(v_min=-2.0, v_max=2.0, n_bins=8)       # centres -1.75, -1.25, ..., 1.75
PI0_FIRST = torch.tensor([0.5, 0.3, 0.2])
PI0_SECOND = torch.tensor([[0.2, 0.5, 0.3], [0.5, 0.25, 0.25], [0.1, 0.1, 0.8]])
# R(first, second), on bin centres. Token 0 is a safe start (0.25 or 0.75); token 1 a gamble
# (-1.75 or +1.75): its mean is lower, but the tilt at beta 2 wants it.
REWARD = torch.tensor([[0.25, 0.75, 0.25], [-1.75, 1.75, -1.75], [-0.25, 0.25, -0.75]])


class TreeLM(torch.nn.Module):
    """pi0 of the depth-2 tree: next-token logits depend on the completion so far; the 'KV cache'
    is simply the ids seen so far."""

    def __init__(self, n_prompt: int):
        super().__init__()
        self.n_prompt = n_prompt

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=True):
        seen = input_ids if cache is None else torch.cat([cache, input_ids], 1)
        completion = seen[:, self.n_prompt:]
        if completion.shape[1] == 0:
            probs = PI0_FIRST.expand(len(seen), 3)
        else:
            probs = PI0_SECOND[completion[:, 0].clamp(max=2)]
        logits = torch.full((len(seen), 5), float("-inf"))
        logits[:, :3] = probs.log()
        return types.SimpleNamespace(logits=logits[:, None, :], cache=seen)


class TreeValues:
    """Exact value histograms of the tree: after one token a, R's distribution under pi0(.|a);
    after two tokens, a point mass on R."""

    vocab_size = 5
    device = torch.device("cpu")

    def start(self, ids, mask):
        return [[] for _ in range(len(ids))]

    def candidate_q(self, state, candidates, beta=None):
        logits = torch.full((*candidates.shape, SUPPORT.n_bins), float("-inf"))
        centres = SUPPORT.centers()
        for row, completion in enumerate(state):
            for j, token in enumerate(candidates[row].tolist()):
                if token > 2:
                    logits[row, j] = 0.0                    # never sampled (pi0 gives it 0)
                    continue
                path = completion + [token]
                rewards, probs = ((REWARD[path[0]], PI0_SECOND[path[0]]) if len(path) == 1
                                  else (REWARD[path[0], path[1]][None], torch.ones(1)))
                for r, p in zip(rewards, probs):
                    b = int((centres - r).abs().argmin())
                    logits[row, j, b] = torch.logaddexp(logits[row, j, b], p.log())
        return value_of(logits, SUPPORT, beta)

    def advance(self, state, tokens):
        for completion, token in zip(state, tokens.tolist()):
            completion.append(token)


def tilted(beta: float) -> torch.Tensor:
    """pi0(y)·exp(beta·R(y))/Z over the 9 sequences, as a (3, 3) table."""
    weights = PI0_FIRST[:, None] * PI0_SECOND * torch.exp(beta * REWARD)
    return weights / weights.sum()


def decoded(beta: float, soft: bool) -> torch.Tensor:
    """The decoder's sequence distribution, from its two steps' token distributions."""
    guidance = ValueGuidance({"r": TreeValues()}, {"r": beta}, VASConfig(top_k=3, soft=soft, min_p=0.0))
    lm = TreeLM(n_prompt=1)
    prompt, mask = torch.tensor([[PROMPT_TOKEN]]), torch.ones(1, 1, dtype=torch.long)
    table = torch.zeros(3, 3)
    guidance.start(prompt, mask)
    first = torch.softmax(guidance.adjust(lm(prompt).logits[:, -1]), -1)[0]
    for a in range(3):
        guidance.start(prompt, mask)
        guidance.advance(torch.tensor([a]))
        logits = lm(torch.tensor([[PROMPT_TOKEN, a]])).logits[:, -1]
        table[a] = first[a] * torch.softmax(guidance.adjust(logits), -1)[0, :3]
    return table


@pytest.fixture(scope="module")
def tree_tokenizer(word_tokenizer):
    return word_tokenizer({"a": 0, "b": 1, "c": 2, "<eos>": EOS, "x": PROMPT_TOKEN}, pad="<eos>")


@pytest.mark.parametrize("beta", [0.5, 2.0, -1.0])
def test_soft_values_reproduce_the_sequence_level_tilt_exactly(beta):
    assert torch.allclose(decoded(beta, soft=True), tilted(beta), atol=1e-6)


def test_mean_value_vas_does_not_reproduce_the_tilt():
    beta = 2.0
    exact, mean_vas = tilted(beta), decoded(beta, soft=False)
    tv = 0.5 * float((mean_vas - exact).abs().sum())
    assert tv > 0.15, tv
    # It under-weights the gamble: the tilt puts most of its first-token mass on token 1.
    assert float(exact[1].sum()) > 0.6 and float(mean_vas[1].sum()) < float(exact[1].sum()) - 0.2


def test_sampling_with_exact_soft_values_matches_the_tilt(tree_tokenizer):
    beta, n = 2.0, 12000
    guidance = ValueGuidance({"r": TreeValues()}, {"r": beta}, VASConfig(top_k=3, min_p=0.0))
    gen = sample(TreeLM(n_prompt=1), tree_tokenizer, ["x"] * n,
                 SamplingConfig(max_new_tokens=2, temperature=1.0, seed=0, batch_size=n), steering=guidance)
    counts = torch.zeros(3, 3)
    for ids in gen.completion_ids:
        counts[ids[0], ids[1]] += 1
    exact = tilted(beta)
    assert 0.5 * float((counts / n - exact).abs().sum()) < 0.02
    # The reported path KL is the exact KL of the tilt: sum_y q(y) log q(y)/pi0(y).
    pi0 = PI0_FIRST[:, None] * PI0_SECOND
    kl = float((exact * (exact / pi0).log()).sum())
    assert sum(gen.kl_nats) / n == pytest.approx(kl, rel=0.03)
