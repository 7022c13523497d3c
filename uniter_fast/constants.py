"""Numbers that UNITER fixes, each named once.

Everything that needs one of these imports it from here (model, ops,
reference twins, kernels), so a value cannot drift between two copies.
"""

#: additive attention score of a padded key: ``(1 - attn_mask) * ATTENTION_MASK_VALUE``
#: (UNITER/BERT; a finite value, so a query whose keys are all padding averages them all)
ATTENTION_MASK_VALUE = -10000.0

#: epsilon of every LayerNorm in UNITER (BERT's ``BertLayerNorm``)
LAYER_NORM_EPS = 1e-12

#: width of a region's box feature ``img_pos_feat``: [x1, y1, x2, y2, w, h, w·h]
BOX_FEATURE_DIM = 7

#: WRA / IPOT defaults of UNITER's ``optimal_transport_dist``
IPOT_BETA = 0.5
IPOT_ITERATIONS = 50
IPOT_INNER_ITERATIONS = 1

#: float32 IPOT needs every real entry of the cost its kernels see in [0, this · beta]:
#: exp(-80) = 1.8e-35 is a normal float32 with room for the products with the plan
#: and the scalings (smallest normal: exp(-87.3)).  ``ops.ipot`` / ``ops.ipot_distance``
#: shift the cost into that range when they can, and reject beta when they cannot.
IPOT_MAX_COST_OVER_BETA = 80.0

#: the IPOT op's row shift stops this many beta above a row's minimum (after the
#: column shift): a row it shifts then weighs at most exp(-24) = 3.8e-11 of a column's
#: total in the first delta, where the unshifted weight is smaller still.
IPOT_ROW_SHIFT_SLACK = 24.0

#: smallest beta of the WRA distance from the embeddings: its cost 1 - cos spans up to 2
WRA_MIN_BETA = 2.0 / IPOT_MAX_COST_OVER_BETA

#: the reference IPOT adds this to the denominators of padded rows/columns
#: (UNITER's ``x_mask``/``y_mask``) so that their sigma/delta are ~0
IPOT_PAD_PENALTY = 1e4

#: ``F.normalize`` epsilon of UNITER's ``cost_matrix_cosine``
COSINE_EPS = 1e-5

#: widest attention head the fused Triton kernel takes (padded to a power of two ≥ 16 inside)
TRITON_ATTENTION_MAX_HEAD_DIM = 128
