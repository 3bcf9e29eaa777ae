/* Fused Group Attention for ONNX Runtime on CPUs: the custom ops ganet.ops::GroupAttention[Shuffle[Split]].
 *
 * The exported GA block (ganet.layers.group_attention.GroupAttention.forward_graph) is memory-bound on a CPU:
 * standard ONNX ops make about nine full passes over the (B, C, H, W) feature map (the logit matmuls, x * u, the
 * pooling matmul, the rank-1 term, the sum), each over the whole batch. This kernel runs the block sample by
 * sample: the U4U logits from a register-tiled matmul, then group by group the masks, the pooled vector and the
 * output. A sample's (C, H*W) map stays in the L2 cache throughout, so it is read from memory once and the output
 * written once. Samples run on ONNX Runtime's intra-op thread pool (API 17+, else in order).
 *
 * Inputs (all float32):
 *   0  x         (B, C, H, W)  the block input
 *   1  u4u_w     (G, C)        the U4U 1x1 conv weight (its bias is dropped: normalize() removes a per-map constant)
 *   2  pair_w    (G, 2, C/G)   pool (row 0) and assign (row 1) 1x1 conv weights of every group
 *   3  params    (7, G)        gamma_u, beta_u, gamma_pool, beta_pool, gamma_assign, beta_assign, alpha
 * Attribute: epsilon (float), the eps of eq. (8).
 * Output: y (B, C, H, W).
 *
 * Two more ops fold the ShuffleNetV2 unit's channel shuffle (and the next unit's split) into the block's output, so
 * that the graph needs no Concat and no Split, each a full pass over the unit's map, around it. They take one more
 * input, 4: a (B, C, H, W), the unit's other branch, and write z = channel_shuffle(concat(a, y), 2), i.e.
 * z[2k] = a[k], z[2k + 1] = y[k]:
 *   GroupAttentionShuffle        output z (B, 2C, H, W)
 *   GroupAttentionShuffleSplit   outputs z[:, :C], z[:, C:] (B, C, H, W) each, the next unit's two halves
 *
 * And one op for the ImageNet stem, which ONNX Runtime runs as five nodes and three layout changes (the max pool's
 * 24 channels are no multiple of its AVX-512 NCHWc block): ganet.ops::Stem, uint8 image -> (x * scale + shift)
 * -> 3x3 stride-2 conv (pad 1) + bias -> ReLU -> 3x3 stride-2 max pool (pad 1), in one pass per sample.
 *   inputs  0 image (B, 3, H, W) uint8, 1 scale (3), 2 shift (3), 3 weight (C, 3, 3, 3), 4 bias (C)   (float32)
 *   output  (B, C, Hp, Wp) with Hc = (H - 1) / 2 + 1, Hp = (Hc - 1) / 2 + 1 (the same for W)
 *
 * Per (sample, group), with u = sigmoid(norm(u_logits)) (eqs. 1, 8, 9):
 *   pool   = softmax_n(norm(sum_k pw_k x_k u))        eq. (3)
 *   assign = sigmoid(norm(sum_k aw_k x_k u))          eq. (5)
 *   e_k    = sum_n x_k u pool                          eq. (4), the weighted-mean reading
 *   y_k    = x_k u + alpha e_k assign                  eqs. (2), (6), (7)
 * norm(a) = gamma (a - mean) / (std + eps) + beta, population std over H*W.
 *
 * Written against the ONNX Runtime C API, which is ABI-stable: the few entries used are declared below by their
 * position in struct OrtApi (API version 13 and later), so no ONNX Runtime headers are needed to build it.
 */
#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ORT_API_VERSION_USED 13
/* From API version 16 a custom op's compute can return an error (KernelComputeV2); before, only leave its output
 * unset. The library declares 16 where the runtime serves it, else 13. */
#define ORT_API_VERSION_COMPUTE_V2 16

typedef struct OrtStatus OrtStatus;
typedef struct OrtValue OrtValue;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtTensorTypeAndShapeInfo OrtTensorTypeAndShapeInfo;

enum { ORT_ELEMENT_FLOAT = 1, ORT_ELEMENT_UINT8 = 2 }; /* ONNXTensorElementDataType */
enum { ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2 }; /* OrtErrorCode */

/* The OrtApi entries this library calls, by index into the struct of function pointers. */
enum {
    API_CreateStatus = 0,
    API_CreateCustomOpDomain = 26,
    API_CustomOpDomainAdd = 27,          /* CustomOpDomain_Add */
    API_AddCustomOpDomain = 28,
    API_GetTensorMutableData = 51,
    API_GetDimensionsCount = 61,
    API_GetDimensions = 62,
    API_GetTensorTypeAndShape = 65,
    API_KernelInfoGetAttributeFloat = 85, /* KernelInfoGetAttribute_float */
    API_KernelContextGetInput = 90,      /* KernelContext_GetInput */
    API_KernelContextGetOutput = 91,     /* KernelContext_GetOutput */
    API_ReleaseStatus = 93,
    API_ReleaseTensorTypeAndShapeInfo = 99,
    API_KernelContextParallelFor = 274,  /* KernelContext_ParallelFor, ONNX Runtime >= 1.17 (API version 17) */
};

typedef void *OrtApiEntry;
typedef struct OrtApiBase {
    const OrtApiEntry *(*GetApi)(uint32_t version);
    const char *(*GetVersionString)(void);
} OrtApiBase;

typedef OrtStatus *(*CreateStatusFn)(int code, const char *msg);
typedef OrtStatus *(*CreateCustomOpDomainFn)(const char *domain, OrtCustomOpDomain **out);
typedef OrtStatus *(*CustomOpDomainAddFn)(OrtCustomOpDomain *domain, const void *op);
typedef OrtStatus *(*AddCustomOpDomainFn)(OrtSessionOptions *options, OrtCustomOpDomain *domain);
typedef OrtStatus *(*GetTensorMutableDataFn)(OrtValue *value, void **out);
typedef OrtStatus *(*GetDimensionsCountFn)(const OrtTensorTypeAndShapeInfo *info, size_t *out);
typedef OrtStatus *(*GetDimensionsFn)(const OrtTensorTypeAndShapeInfo *info, int64_t *dims, size_t n);
typedef OrtStatus *(*GetTensorTypeAndShapeFn)(const OrtValue *value, OrtTensorTypeAndShapeInfo **out);
typedef OrtStatus *(*KernelInfoGetAttributeFloatFn)(const OrtKernelInfo *info, const char *name, float *out);
typedef OrtStatus *(*KernelContextGetInputFn)(const OrtKernelContext *ctx, size_t index, const OrtValue **out);
typedef OrtStatus *(*KernelContextGetOutputFn)(OrtKernelContext *ctx, size_t index, const int64_t *dims, size_t n,
                                                OrtValue **out);
typedef void (*ReleaseStatusFn)(OrtStatus *status);
typedef void (*ReleaseTensorTypeAndShapeInfoFn)(OrtTensorTypeAndShapeInfo *info);
typedef OrtStatus *(*KernelContextParallelForFn)(const OrtKernelContext *ctx, void (*fn)(void *, size_t),
                                                  size_t total, size_t num_batch, void *user_data);

#define API(table, name) ((name##Fn)(table)[API_##name])

static const OrtApiEntry *g_api;
static int g_has_parallel_for; /* the runtime serves API version 17: its intra-op thread pool runs our samples */

/* struct OrtCustomOp up to API version 16 (each version appends fields, which ONNX Runtime reads only when the op
 * declares a version that has them). */
typedef struct OrtCustomOp {
    uint32_t version;
    void *(*CreateKernel)(const struct OrtCustomOp *op, const OrtApiEntry *api, const OrtKernelInfo *info);
    const char *(*GetName)(const struct OrtCustomOp *op);
    const char *(*GetExecutionProviderType)(const struct OrtCustomOp *op);
    int (*GetInputType)(const struct OrtCustomOp *op, size_t index);
    size_t (*GetInputTypeCount)(const struct OrtCustomOp *op);
    int (*GetOutputType)(const struct OrtCustomOp *op, size_t index);
    size_t (*GetOutputTypeCount)(const struct OrtCustomOp *op);
    void (*KernelCompute)(void *kernel, OrtKernelContext *ctx);
    void (*KernelDestroy)(void *kernel);
    int (*GetInputCharacteristic)(const struct OrtCustomOp *op, size_t index);
    int (*GetOutputCharacteristic)(const struct OrtCustomOp *op, size_t index);
    int (*GetInputMemoryType)(const struct OrtCustomOp *op, size_t index);
    /* version 14 */
    int (*GetVariadicInputMinArity)(const struct OrtCustomOp *op);
    int (*GetVariadicInputHomogeneity)(const struct OrtCustomOp *op);
    int (*GetVariadicOutputMinArity)(const struct OrtCustomOp *op);
    int (*GetVariadicOutputHomogeneity)(const struct OrtCustomOp *op);
    /* version 16 */
    OrtStatus *(*CreateKernelV2)(const struct OrtCustomOp *op, const OrtApiEntry *api, const OrtKernelInfo *info,
                                 void **kernel);
    OrtStatus *(*KernelComputeV2)(void *kernel, OrtKernelContext *ctx);
} OrtCustomOp;

/* What a node writes (see the header): y, the shuffled z, or z's two halves. */
enum { MODE_PLAIN = 0, MODE_SHUFFLE = 1, MODE_SHUFFLE_SPLIT = 2, MODE_STEM = 3 };

typedef struct {
    OrtCustomOp base; /* first, so that ONNX Runtime's OrtCustomOp pointer is also a GanetOp pointer */
    int mode;
    const char *name;
    size_t inputs, outputs;
    int input0_type; /* the image or x; every other input and output is float32 */
} GanetOp;

typedef struct {
    float eps;
    int mode;
} GroupAttentionKernel;

/* Where a sample's output channels go. Channel j of z (MODE_PLAIN: of y) of sample s starts at out_row(map, s, j):
 * the shuffle and the split are only addresses. */
typedef struct {
    int mode;
    int64_t ch, n; /* C (the block's channels) and H*W */
    float *y0, *y1;
} OutMap;

static inline float *out_row(const OutMap *m, int64_t s, int64_t j) {
    if (m->mode == MODE_PLAIN) return m->y0 + (s * m->ch + j) * m->n;
    if (m->mode == MODE_SHUFFLE) return m->y0 + (s * 2 * m->ch + j) * m->n;
    return j < m->ch ? m->y0 + (s * m->ch + j) * m->n : m->y1 + (s * m->ch + j - m->ch) * m->n;
}

/* channel k of the block's output y, as a channel of what the node writes */
static inline int64_t y_channel(const OutMap *m, int64_t k) { return m->mode == MODE_PLAIN ? k : 2 * k + 1; }

/* ---- the arithmetic --------------------------------------------------------------------------------------- */

/* The library is built with -ffast-math, so gcc vectorises these reductions with several accumulators. */

/* exp(v) as 2^(v log2 e): the integer part goes into the exponent bits, the fraction through a degree-6 polynomial.
 * Relative error (measured against double exp): < 3.5e-7 for |v| <= 20, where the kernel's normalised logits live,
 * < 1.2e-6 up to |v| = 80 (the rounding of v log2 e); the sigmoid built on it is within 9e-8. Inline, so that every
 * loop that calls it vectorises; libm's vector expf is a call per vector and measured ~30% slower over the kernel. */
static inline float exp_approx(float v) {
    v = v < -87.f ? -87.f : (v > 88.f ? 88.f : v);
    const float t = v * 1.44269504088896341f;
    const float whole = __builtin_floorf(t + 0.5f);
    const float f = t - whole; /* in [-0.5, 0.5] */
    float p = 1.535336188319500e-4f;
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.f;
    const int32_t bits = ((int32_t)whole + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline float sigmoid_approx(float v) { return 1.f / (1.f + exp_approx(-v)); }

static float centred_square_sum(const float *a, float mean, int64_t n) {
    float s = 0.f;
    for (int64_t i = 0; i < n; ++i) s += (a[i] - mean) * (a[i] - mean);
    return s;
}

static float sum_of(const float *a, int64_t n) {
    float s = 0.f;
    for (int64_t i = 0; i < n; ++i) s += a[i];
    return s;
}


/* normalize() of eqs. (8)-(9): gamma (a - mean) / (std + eps) + beta = (a - mean) * scale + beta, with the
 * population std from the centred squares (two passes: exact enough in fp32, unlike E[a^2] - mean^2). The centring
 * stays a subtraction: folding it into one multiply-add (scale a + shift) cancels catastrophically when the map
 * is nearly constant and scale ~ 1 / eps. */
typedef struct {
    float mean, scale, beta;
} Norm;

static inline Norm affine_norm(float sum, float centred_squares, int64_t n, float gamma, float beta, float eps) {
    Norm r = {sum / (float)n, 0.f, beta};
    r.scale = gamma / (sqrtf(centred_squares / (float)n) + eps);
    return r;
}

static inline float apply_norm(Norm nm, float a) { return (a - nm.mean) * nm.scale + nm.beta; }

#define SCRATCH_PAD 48
#define CHANNEL_BLOCK 4 /* channels per entity/output pass (measured best of 2, 4, 8 for C/G = 4, 8, 16) */
#define PAIR_BLOCK 8    /* channels per pool/assign pass (measured best of 4, 8, 16) */

/* The U4U logits of one sample, (G, C) @ (C, N) -> (G, N) (eq. 1's 1x1 conv, without its bias): tiles of
 * GEMM_PIXELS pixels x GEMM_GROUPS groups accumulate in registers over all C channels, so x is read once per group
 * tile and the logits written once. ``wt`` is the weight transposed and zero-padded to (tiles, C, GEMM_GROUPS). */
/* measured on a Zen 4 (AVX-512): 16 x 16 runs 2-3x faster than 8 x 8 at 32x32 maps */
#if defined(__AVX512F__)
#define GEMM_PIXELS 16 /* 16 accumulators of 16 lanes: half the 32 vector registers */
#define GEMM_GROUPS 16
#else
#define GEMM_PIXELS 8 /* AVX2: 16 registers, so 8 accumulators of 8 lanes */
#define GEMM_GROUPS 8
#endif
typedef float pixels_v __attribute__((vector_size(GEMM_PIXELS * sizeof(float))));

static void u4u_logits(const float *restrict x, const float *restrict wt, int64_t groups, int64_t ch, int64_t n,
                       float *restrict logits, int64_t logits_stride) {
    const int64_t tiles = (groups + GEMM_GROUPS - 1) / GEMM_GROUPS;
    const int64_t n_vec = n - n % GEMM_PIXELS;
    for (int64_t t = 0; t < tiles; ++t) {
        const float *restrict w = wt + t * ch * GEMM_GROUPS;
        const int64_t g0 = t * GEMM_GROUPS;
        const int64_t gn = groups - g0 < GEMM_GROUPS ? groups - g0 : GEMM_GROUPS;
        for (int64_t p = 0; p < n_vec; p += GEMM_PIXELS) {
            pixels_v acc[GEMM_GROUPS] = {{0}};
            for (int64_t k = 0; k < ch; ++k) {
                pixels_v xv;
                memcpy(&xv, x + k * n + p, sizeof xv);
                for (int j = 0; j < GEMM_GROUPS; ++j) acc[j] += w[k * GEMM_GROUPS + j] * xv;
            }
            for (int64_t j = 0; j < gn; ++j) memcpy(logits + (g0 + j) * logits_stride + p, &acc[j], sizeof acc[j]);
        }
        for (int64_t p = n_vec; p < n; ++p)
            for (int64_t j = 0; j < gn; ++j) {
                float a = 0.f;
                for (int64_t k = 0; k < ch; ++k) a += w[k * GEMM_GROUPS + j] * x[k * n + p];
                logits[(g0 + j) * logits_stride + p] = a;
            }
    }
}

/* y_k = x_k u + e_k assign over one map (restrict: separate arrays, so gcc vectorises without alias checks) */
static inline void output_channel(float *restrict y, const float *restrict x, const float *restrict u,
                                  const float *restrict assign, float entity, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] = x[i] * u[i] + entity * assign[i];
}

/* One (sample s, group g): x is a (c, n) slice, u_logits is (n), the output goes where ``out`` says; scratch holds
 * 4 (n + SCRATCH_PAD) floats.
 * A handful of passes over the group's maps, every one over data in the L1/L2 cache; the channel loops are unrolled where
 * the caller passes a constant c, so each pass reads all c channels of a pixel at once. */
static inline __attribute__((always_inline)) void group_attention_slice(
    const float *restrict x, const float *restrict u_logits, const float *restrict pool_w,
    const float *restrict assign_w, const float *restrict params, int64_t g, int64_t groups, const int64_t c,
    int64_t n, float eps, const OutMap *out, int64_t s, float *restrict scratch) {
    /* The maps sit SCRATCH_PAD floats apart beyond their length, so that they are not a multiple of 4 KiB apart
     * (false load/store dependencies). */
    const int64_t stride = n + SCRATCH_PAD;
    float *restrict u = scratch, *restrict pool = scratch + stride, *restrict assign = scratch + 2 * stride;
    float *restrict weight = scratch + 3 * stride;
    const float gamma_u = params[0 * groups + g], beta_u = params[1 * groups + g];
    const float gamma_p = params[2 * groups + g], beta_p = params[3 * groups + g];
    const float gamma_a = params[4 * groups + g], beta_a = params[5 * groups + g];
    const float alpha = params[6 * groups + g];

    /* eq. (1): u = sigmoid(normalize(U4U logits)) */
    const float u_sum = sum_of(u_logits, n);
    const Norm norm_u = affine_norm(u_sum, centred_square_sum(u_logits, u_sum / (float)n, n), n, gamma_u, beta_u,
                                    eps);
    /* eqs. (3), (5): pool and assign logits over x * u, = u * sum_k w_k x_k. Channels beyond the first PAIR_BLOCK
     * are summed into pool/assign first, PAIR_BLOCK per pass; the last pass adds the first ones and applies u. */
    const int64_t head = c < PAIR_BLOCK ? c : PAIR_BLOCK;
    for (int64_t k0 = head; k0 < c; k0 += PAIR_BLOCK) {
        const int64_t kn = c - k0 < PAIR_BLOCK ? c - k0 : PAIR_BLOCK;
        for (int64_t i = 0; i < n; ++i) {
            float p = k0 == head ? 0.f : pool[i], a = k0 == head ? 0.f : assign[i];
            for (int64_t k = k0; k < k0 + kn; ++k) {
                p += pool_w[k] * x[k * n + i];
                a += assign_w[k] * x[k * n + i];
            }
            pool[i] = p;
            assign[i] = a;
        }
    }
    float pool_sum = 0.f, assign_sum = 0.f;
    for (int64_t i = 0; i < n; ++i) {
        float p = c > head ? pool[i] : 0.f, a = c > head ? assign[i] : 0.f;
        for (int64_t k = 0; k < head; ++k) {
            p += pool_w[k] * x[k * n + i];
            a += assign_w[k] * x[k * n + i];
        }
        const float ui = sigmoid_approx(apply_norm(norm_u, u_logits[i]));
        u[i] = ui;
        pool[i] = p * ui;
        assign[i] = a * ui;
        pool_sum += p * ui;
        assign_sum += a * ui;
    }
    const float pool_mean = pool_sum / (float)n, assign_mean = assign_sum / (float)n;
    float pool_sq = 0.f, assign_sq = 0.f;
    for (int64_t i = 0; i < n; ++i) {
        pool_sq += (pool[i] - pool_mean) * (pool[i] - pool_mean);
        assign_sq += (assign[i] - assign_mean) * (assign[i] - assign_mean);
    }
    const Norm norm_p = affine_norm(pool_sum, pool_sq, n, gamma_p, beta_p, eps);
    const Norm norm_a = affine_norm(assign_sum, assign_sq, n, gamma_a, beta_a, eps);
    /* the assign mask times alpha (eqs. 5, 7); the normalised pool logits and their maximum (for the softmax) */
    float top = apply_norm(norm_p, pool[0]); /* (not -INFINITY: -ffast-math assumes finite values) */
    for (int64_t i = 0; i < n; ++i) {
        assign[i] = alpha * sigmoid_approx(apply_norm(norm_a, assign[i]));
        pool[i] = apply_norm(norm_p, pool[i]);
        top = pool[i] > top ? pool[i] : top;
    }
    /* softmax numerators; eq. (4) pools x * u, so x's weight is softmax * u (the 1 / total is applied to e_k) */
    float total = 0.f;
    for (int64_t i = 0; i < n; ++i) {
        const float e = exp_approx(pool[i] - top);
        total += e;
        weight[i] = e * u[i];
    }
    const float inv_total = 1.f / total;
    /* eq. (4), the weighted-mean reading, e_k = sum_i x_k softmax u; then eqs. (2), (6), (7): y_k = x_k u +
     * alpha e_k assign. A few channels go through each pass together; more would not fit the vector registers. */
    for (int64_t k0 = 0; k0 < c; k0 += CHANNEL_BLOCK) {
        const int64_t kn = c - k0 < CHANNEL_BLOCK ? c - k0 : CHANNEL_BLOCK;
        const float *restrict xb = x + k0 * n;
        float entity[CHANNEL_BLOCK] = {0};
        for (int64_t i = 0; i < n; ++i)
            for (int64_t k = 0; k < kn; ++k) entity[k] += xb[k * n + i] * weight[i];
        for (int64_t k = 0; k < kn; ++k)
            output_channel(out_row(out, s, y_channel(out, g * c + k0 + k)), xb + k * n, u, assign,
                           entity[k] * inv_total, n);
    }
}

/* group_attention_slice with the channels per group known at compile time for the common widths (branch widths
 * 60/120/240 with G = 15 give 4/8/16), so that gcc unrolls the channel loops and vectorises over pixels. */
static void group_attention_slice_any(const float *x, const float *u_logits, const float *pool_w,
                                      const float *assign_w, const float *params, int64_t g, int64_t groups,
                                      int64_t c, int64_t n, float eps, const OutMap *out, int64_t s,
                                      float *scratch) {
#define SLICE(C) \
    group_attention_slice(x, u_logits, pool_w, assign_w, params, g, groups, C, n, eps, out, s, scratch)
    switch (c) {
        case 1: SLICE(1); break;
        case 2: SLICE(2); break;
        case 4: SLICE(4); break;
        case 8: SLICE(8); break;
        case 16: SLICE(16); break;
        default: SLICE(c); break;
    }
#undef SLICE
}

/* ---- the ONNX Runtime plumbing ---------------------------------------------------------------------------- */

static const char *kDomain = "ganet.ops";

static void *create_kernel(const OrtCustomOp *op, const OrtApiEntry *api, const OrtKernelInfo *info) {
    GroupAttentionKernel *k = malloc(sizeof *k);
    if (!k) return NULL;
    k->mode = ((const GanetOp *)op)->mode;
    k->eps = 1e-5f;
    OrtStatus *st = API(api, KernelInfoGetAttributeFloat)(info, "epsilon", &k->eps);
    if (st) API(api, ReleaseStatus)(st); /* absent: the paper's default */
    return k;
}

static int shape_of(const OrtValue *v, int64_t *dims, size_t max_dims, size_t *count) {
    OrtTensorTypeAndShapeInfo *info = NULL;
    OrtStatus *st = API(g_api, GetTensorTypeAndShape)(v, &info);
    if (st) {
        API(g_api, ReleaseStatus)(st);
        return 0;
    }
    int ok = 1;
    st = API(g_api, GetDimensionsCount)(info, count);
    if (st || *count > max_dims) ok = 0;
    if (st) API(g_api, ReleaseStatus)(st);
    if (ok) {
        st = API(g_api, GetDimensions)(info, dims, *count);
        if (st) {
            API(g_api, ReleaseStatus)(st);
            ok = 0;
        }
    }
    API(g_api, ReleaseTensorTypeAndShapeInfo)(info);
    return ok;
}

static const float *input_data(OrtKernelContext *ctx, size_t index, int64_t *dims, size_t *count) {
    const OrtValue *v = NULL;
    OrtStatus *st = API(g_api, KernelContextGetInput)(ctx, index, &v);
    if (st) {
        API(g_api, ReleaseStatus)(st);
        return NULL;
    }
    if (!shape_of(v, dims, 4, count)) return NULL;
    void *data = NULL;
    st = API(g_api, GetTensorMutableData)((OrtValue *)v, &data);
    if (st) {
        API(g_api, ReleaseStatus)(st);
        return NULL;
    }
    return data;
}

typedef struct {
    const float *x, *a; /* a: the other branch (shuffle modes only) */
    OutMap out;
    const float *wt, *pair_w, *params;
    int64_t ch, n, groups, c;
    float eps;
    int failed; /* a sample could not get its scratch memory */
} SampleJob;

/* Per-thread scratch, kept between calls and freed when the thread exits: a malloc/free per sample on ONNX
 * Runtime's pool threads had glibc return the pages and fault them in again every time (2 threads, batch 32:
 * GA/baseline 1.30 with it, 1.10 without). */
static __thread float *tls_scratch;
static __thread size_t tls_scratch_len;
static pthread_key_t scratch_key;
static pthread_once_t scratch_key_once = PTHREAD_ONCE_INIT;

static void make_scratch_key(void) { pthread_key_create(&scratch_key, free); }

static float *thread_scratch(size_t floats) {
    if (floats > tls_scratch_len) {
        pthread_once(&scratch_key_once, make_scratch_key);
        free(tls_scratch);
        tls_scratch = malloc(floats * sizeof(float));
        tls_scratch_len = tls_scratch ? floats : 0;
        pthread_setspecific(scratch_key, tls_scratch); /* its destructor frees the buffer at thread exit */
    }
    return tls_scratch;
}

/* One sample: its U4U logits (G, N), then every group. The sample's (C, N) map (<= 1 MB at 224x224) stays in the
 * L2 cache from the logits to the output. */
static void run_sample(void *arg, size_t s) {
    SampleJob *job = arg;
    const int64_t ch = job->ch, n = job->n, groups = job->groups, c = job->c, stride = n + SCRATCH_PAD;
    float *scratch = thread_scratch((size_t)((groups + 4) * stride));
    if (!scratch) {
        __atomic_store_n(&job->failed, 1, __ATOMIC_RELAXED); /* compute() reports it */
        return;
    }
    float *logits = scratch, *maps = scratch + groups * stride;
    const float *x = job->x + (int64_t)s * ch * n;
    u4u_logits(x, job->wt, groups, ch, n, logits, stride);
    for (int64_t g = 0; g < groups; ++g)
        group_attention_slice_any(x + g * c * n, logits + g * stride, job->pair_w + g * 2 * c,
                                  job->pair_w + g * 2 * c + c, job->params, g, groups, c, n, job->eps, &job->out,
                                  (int64_t)s, maps);
    if (job->a) /* the other branch into the even channels of z */
        for (int64_t k = 0; k < ch; ++k)
            memcpy(out_row(&job->out, (int64_t)s, 2 * k), job->a + ((int64_t)s * ch + k) * n,
                   (size_t)n * sizeof(float));
}

static float *output_data(OrtKernelContext *ctx, size_t index, const int64_t *dims) {
    OrtValue *out = NULL;
    OrtStatus *st = API(g_api, KernelContextGetOutput)(ctx, index, dims, 4, &out);
    if (st) {
        API(g_api, ReleaseStatus)(st);
        return NULL;
    }
    float *data = NULL;
    st = API(g_api, GetTensorMutableData)(out, (void **)&data);
    if (st) {
        API(g_api, ReleaseStatus)(st);
        return NULL;
    }
    return data;
}

/* fn(job, s) for every sample s < b. Samples are independent: ONNX Runtime's intra-op pool runs them (API 17+;
 * one thread, or an older runtime: in order, on this thread). */
static void for_each_sample(OrtKernelContext *ctx, void (*fn)(void *, size_t), int64_t b, void *job) {
    if (g_has_parallel_for && b > 1) {
        OrtStatus *st = API(g_api, KernelContextParallelFor)(ctx, fn, (size_t)b, 0, job);
        if (!st) return;
        API(g_api, ReleaseStatus)(st);
    }
    for (int64_t s = 0; s < b; ++s) fn(job, (size_t)s);
}

/* Thread-local, so that concurrent sessions do not share it; compute_v2 copies it into the OrtStatus. */
static __thread char error_text[512];

static const char *shape_error(const char *op, const char *what, const int64_t *dims, size_t count,
                               const char *expected) {
    char shape[160] = "";
    for (size_t i = 0; i < count && i < 6; ++i) {
        const size_t used = strlen(shape);
        snprintf(shape + used, sizeof shape - used, i ? ", %lld" : "%lld", (long long)dims[i]);
    }
    snprintf(error_text, sizeof error_text, "ganet.ops::%s: %s has shape (%s); expected %s", op, what, shape, expected);
    return error_text;
}

/* Runs one node; returns NULL, or what went wrong. The shapes were fixed when the graph was written, so a mismatch
 * means a hand-edited graph, and it must fail the run rather than read out of bounds. */
static const char *run_node(const GroupAttentionKernel *k, OrtKernelContext *ctx) {
    int64_t xd[4], ud[4], wd[4], pd[4];
    size_t xn = 0, un = 0, wn = 0, pn = 0;
    const float *x = input_data(ctx, 0, xd, &xn);
    const float *u4u_w = input_data(ctx, 1, ud, &un);
    const float *pair_w = input_data(ctx, 2, wd, &wn);
    const float *params = input_data(ctx, 3, pd, &pn);
    if (!x || !u4u_w || !pair_w || !params) return "ganet.ops::GroupAttention: cannot read its inputs";
    if (xn != 4 || xd[2] * xd[3] < 1) return shape_error("GroupAttention", "x", xd, xn, "(B, C, H, W) with H, W >= 1");
    if (wn != 3 || wd[0] < 1 || wd[1] != 2 || wd[0] * wd[2] != xd[1])
        return shape_error("GroupAttention", "pair_weight", wd, wn, "(G, 2, C/G) for x's C channels");
    if (un != 2 || ud[0] != wd[0] || ud[1] != xd[1])
        return shape_error("GroupAttention", "u4u_weight", ud, un, "(G, C)");
    if (pn != 2 || pd[0] != 7 || pd[1] != wd[0]) return shape_error("GroupAttention", "params", pd, pn, "(7, G)");
    const int64_t b = xd[0], ch = xd[1], n = xd[2] * xd[3], groups = wd[0], c = wd[2];
    const float *a = NULL;
    if (k->mode != MODE_PLAIN) { /* the other branch: the same shape as x */
        int64_t ad[4];
        size_t an = 0;
        a = input_data(ctx, 4, ad, &an);
        if (!a) return "ganet.ops::GroupAttention: cannot read input a";
        if (an != 4 || memcmp(ad, xd, sizeof xd)) return shape_error("GroupAttention", "a", ad, an, "x's shape");
    }

    OutMap out = {k->mode, ch, n, NULL, NULL};
    if (k->mode == MODE_SHUFFLE) {
        const int64_t zd[4] = {b, 2 * ch, xd[2], xd[3]};
        out.y0 = output_data(ctx, 0, zd);
    } else {
        out.y0 = output_data(ctx, 0, xd);
        if (k->mode == MODE_SHUFFLE_SPLIT) out.y1 = output_data(ctx, 1, xd);
    }
    if (!out.y0 || (k->mode == MODE_SHUFFLE_SPLIT && !out.y1))
        return "ganet.ops::GroupAttention: cannot allocate its output";
    /* The U4U weight transposed and zero-padded into (tiles, C, GEMM_GROUPS), shared by every sample. */
    const int64_t tiles = (groups + GEMM_GROUPS - 1) / GEMM_GROUPS;
    float *wt = calloc((size_t)(tiles * ch * GEMM_GROUPS), sizeof(float));
    if (!wt) return "ganet.ops::GroupAttention: out of memory";
    for (int64_t g = 0; g < groups; ++g)
        for (int64_t kk = 0; kk < ch; ++kk)
            wt[((g / GEMM_GROUPS) * ch + kk) * GEMM_GROUPS + g % GEMM_GROUPS] = u4u_w[g * ch + kk];
    SampleJob job = {x, a, out, wt, pair_w, params, ch, n, groups, c, k->eps, 0};
    for_each_sample(ctx, run_sample, b, &job);
    free(wt);
    return job.failed ? "ganet.ops::GroupAttention: out of memory" : NULL;
}

/* ---- the stem ------------------------------------------------------------------------------------------ */

/* The conv's padded input row P (P[0] and P[W + 1] are the zero padding, P[q] = norm(image[q - 1])) is kept as four
 * phase planes, ph[k][j] = P[4j + k]: conv output x reads P[2x .. 2x + 2], so the even outputs x = 2j read
 * ph0[j], ph1[j], ph2[j] and the odd ones x = 2j + 1 read ph2[j], ph3[j], ph0[j + 1] -- contiguous vectors either
 * way. The conv rows are written the same way, even and odd outputs apart, which is what the stride-2 pool reads:
 * pool output p = max(conv[2p - 1], conv[2p], conv[2p + 1]) = max(odd[p - 1], even[p], odd[p]). Values after the
 * ReLU are >= 0, so the pool's padding can be 0 instead of -inf. */
#define STEM_CB 8 /* output channels per register block */

typedef struct {
    const uint8_t *image;
    float *out;
    const float *w;     /* (C_pad, 27) weights, zero beyond C */
    const float *bias;  /* (C_pad) */
    float scale[3], shift[3];
    int64_t h, w_in, c, c_pad, hc, wc, hp, wp;
    int64_t plane;      /* floats per phase plane (>= (W + 2) / 4 + 1, a multiple of GEMM_PIXELS, + slack) */
    int64_t half;       /* floats per even/odd conv row plane (+ 1 leading zero for odd[-1]) */
    int failed;
} StemJob;

/* P row r (0 .. H + 1) of every input channel, normalised, into its 4 phase planes: (3, 4, plane) floats. */
static void stem_input_row(const StemJob *job, const uint8_t *img, int64_t r, float *restrict dst) {
    memset(dst, 0, (size_t)(3 * 4 * job->plane) * sizeof(float));
    if (r < 1 || r > job->h) return; /* a padding row */
    for (int ch = 0; ch < 3; ++ch) {
        const uint8_t *row = img + (ch * job->h + r - 1) * job->w_in;
        float *phases = dst + ch * 4 * job->plane;
        const float s = job->scale[ch], t = job->shift[ch];
        for (int k = 0; k < 4; ++k) { /* phase k holds P[4j + k] = norm(row[4j + k - 1]) */
            float *restrict dst_k = phases + k * job->plane;
            /* the j with 4j + k in [1, W] */
            const int64_t first = k == 0 ? 1 : 0, end = job->w_in >= k ? (job->w_in - k) / 4 + 1 : 0;
            for (int64_t j = first; j < end; ++j) dst_k[j] = (float)row[4 * j + k - 1] * s + t;
        }
    }
}

static inline float max3(float a, float b, float c) {
    const float m = a > b ? a : b;
    return m > c ? m : c;
}

/* One pool output row of one channel from its three conv rows r0..r2 (a row repeated where the window has fewer):
 * out[p] = max(odd[p - 1], even[p], odd[p]) over the rows. */
static void stem_pool_row(const float *restrict r0, const float *restrict r1, const float *restrict r2, int64_t half,
                          int64_t wp, float *restrict out, float *restrict ev, float *restrict od) {
    for (int64_t j = 0; j <= wp; ++j) {
        ev[j] = max3(r0[j], r1[j], r2[j]);
        od[j] = max3(r0[half + j], r1[half + j], r2[half + j]); /* od[j] = odd[j - 1]: odd[-1] is the zero first */
    }
    for (int64_t px = 0; px < wp; ++px) {
        const float m = ev[px] > od[px] ? ev[px] : od[px];
        out[px] = od[px + 1] > m ? od[px + 1] : m;
    }
}

/* Conv row y: ``rows`` are P rows 2y, 2y + 1, 2y + 2 (phase planes); writes even/odd planes of every channel,
 * (c_pad, 2, half): even at [0, half), odd at [half + 1, ...) with odd[-1] = 0. Bias and ReLU applied. */
static void stem_conv_row(const StemJob *job, const float *const rows[3], float *restrict conv) {
    const int64_t plane = job->plane, half = job->half;
    const int64_t n_even = (job->wc + 1) / 2, n_odd = job->wc / 2;
    for (int64_t c0 = 0; c0 < job->c_pad; c0 += STEM_CB) {
        const float *restrict w = job->w + c0 * 27;
        for (int parity = 0; parity < 2; ++parity) {
            const int64_t count = parity ? n_odd : n_even;
            /* the three taps of a kernel row: (phase, offset) */
            const int tap_phase[2][3] = {{0, 1, 2}, {2, 3, 0}};
            const int tap_shift[2][3] = {{0, 0, 0}, {0, 0, 1}};
            for (int64_t j = 0; j < count; j += GEMM_PIXELS) {
                pixels_v acc[STEM_CB];
                for (int k = 0; k < STEM_CB; ++k)
                    for (int l = 0; l < GEMM_PIXELS; ++l) acc[k][l] = job->bias[c0 + k];
                for (int ky = 0; ky < 3; ++ky)
                    for (int ch = 0; ch < 3; ++ch)
                        for (int kx = 0; kx < 3; ++kx) {
                            pixels_v xv;
                            memcpy(&xv, rows[ky] + (ch * 4 + tap_phase[parity][kx]) * plane + j +
                                            tap_shift[parity][kx], sizeof xv);
                            const int tap = (ch * 3 + ky) * 3 + kx; /* the ONNX weight order (C, 3, kH, kW) */
                            for (int k = 0; k < STEM_CB; ++k) acc[k] += w[k * 27 + tap] * xv;
                        }
                for (int k = 0; k < STEM_CB; ++k) {
                    float *dst = conv + (c0 + k) * 2 * half + (parity ? half + 1 : 0) + j;
                    for (int l = 0; l < GEMM_PIXELS; ++l) dst[l] = acc[k][l] > 0.f ? acc[k][l] : 0.f;
                }
            }
            if (parity) /* the pool reads odd[n_odd] at the right edge when W is odd: it is padding */
                for (int64_t k = 0; k < STEM_CB; ++k) {
                    float *odd = conv + (c0 + k) * 2 * half + half;
                    odd[0] = 0.f;
                    for (int64_t j = n_odd; j < half - 1; ++j) odd[1 + j] = 0.f;
                }
        }
    }
}

static void stem_sample(void *arg, size_t s) {
    StemJob *job = arg;
    const int64_t plane = job->plane, half = job->half, in_row = 3 * 4 * plane, conv_row = job->c_pad * 2 * half;
    float *scratch = thread_scratch((size_t)(3 * in_row + 3 * conv_row + 2 * half + 2 + GEMM_PIXELS));
    if (!scratch) {
        __atomic_store_n(&job->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    float *in_ring = scratch, *conv_ring = scratch + 3 * in_row, *pool_tmp = conv_ring + 3 * conv_row;
    const uint8_t *img = job->image + (int64_t)s * 3 * job->h * job->w_in;
    float *out = job->out + (int64_t)s * job->c * job->hp * job->wp;
    int64_t have_in = -1, have_conv = -1; /* the last P row / conv row computed */
    for (int64_t py = 0; py < job->hp; ++py) {
        /* conv rows 2py - 1 .. 2py + 1 (those that exist), each computed once, in a ring of three */
        const int64_t last = 2 * py + 1 < job->hc ? 2 * py + 1 : job->hc - 1;
        while (have_conv < last) {
            const int64_t y = ++have_conv;
            while (have_in < 2 * y + 2) {
                ++have_in;
                stem_input_row(job, img, have_in, in_ring + (have_in % 3) * in_row);
            }
            const float *rows[3] = {in_ring + ((2 * y) % 3) * in_row, in_ring + ((2 * y + 1) % 3) * in_row,
                                    in_ring + ((2 * y + 2) % 3) * in_row};
            stem_conv_row(job, rows, conv_ring + (y % 3) * conv_row);
        }
        float *ev = pool_tmp, *od = pool_tmp + half + 1;
        for (int64_t c = 0; c < job->c; ++c) {
            const float *rows[3];
            int n = 0;
            for (int64_t y = 2 * py - 1; y <= 2 * py + 1; ++y) /* padding rows: 0 changes no max of values >= 0 */
                if (y >= 0 && y < job->hc) rows[n++] = conv_ring + (y % 3) * conv_row + c * 2 * half;
            while (n < 3) rows[n] = rows[n - 1], ++n; /* (a repeated row changes no max) */
            stem_pool_row(rows[0], rows[1], rows[2], half, job->wp, out + (c * job->hp + py) * job->wp, ev, od);
        }
    }
}

/* Runs one Stem node; returns NULL, or what went wrong. */
static const char *run_stem(OrtKernelContext *ctx) {
    int64_t id[4], sd[4], td[4], wd[4], bd[4];
    size_t in = 0, sn = 0, tn = 0, wn = 0, bn = 0;
    const uint8_t *image = (const uint8_t *)input_data(ctx, 0, id, &in);
    const float *scale = input_data(ctx, 1, sd, &sn), *shift = input_data(ctx, 2, td, &tn);
    const float *weight = input_data(ctx, 3, wd, &wn), *bias = input_data(ctx, 4, bd, &bn);
    if (!image || !scale || !shift || !weight || !bias) return "ganet.ops::Stem: cannot read its inputs";
    if (in != 4 || id[1] != 3 || id[2] < 1 || id[3] < 1)
        return shape_error("Stem", "image", id, in, "(B, 3, H, W) uint8");
    if (wn != 4 || wd[0] < 1 || wd[1] != 3 || wd[2] != 3 || wd[3] != 3)
        return shape_error("Stem", "weight", wd, wn, "(C, 3, 3, 3)");
    if (bn != 1 || bd[0] != wd[0]) return shape_error("Stem", "bias", bd, bn, "(C)");
    if (sn != 1 || sd[0] != 3) return shape_error("Stem", "scale", sd, sn, "(3)");
    if (tn != 1 || td[0] != 3) return shape_error("Stem", "shift", td, tn, "(3)");
    StemJob job = {image, NULL, NULL, NULL, {scale[0], scale[1], scale[2]}, {shift[0], shift[1], shift[2]},
                   id[2], id[3], wd[0], (wd[0] + STEM_CB - 1) / STEM_CB * STEM_CB, 0, 0, 0, 0, 0, 0, 0};
    job.hc = (job.h - 1) / 2 + 1, job.wc = (job.w_in - 1) / 2 + 1;
    job.hp = (job.hc - 1) / 2 + 1, job.wp = (job.wc - 1) / 2 + 1;
    const int64_t tiles = ((job.wc + 1) / 2 + GEMM_PIXELS - 1) / GEMM_PIXELS;
    job.plane = tiles * GEMM_PIXELS + GEMM_PIXELS; /* vector loads up to j + GEMM_PIXELS (+1 for the odd taps) */
    job.half = tiles * GEMM_PIXELS + 1;
    const int64_t od[4] = {id[0], wd[0], job.hp, job.wp};
    job.out = output_data(ctx, 0, od);
    if (!job.out) return "ganet.ops::Stem: cannot allocate its output";
    float *w = calloc((size_t)(job.c_pad * 28), sizeof(float)); /* (c_pad, 27) weights, then (c_pad) biases */
    if (!w) return "ganet.ops::Stem: out of memory";
    memcpy(w, weight, (size_t)(job.c * 27) * sizeof(float));
    memcpy(w + job.c_pad * 27, bias, (size_t)job.c * sizeof(float));
    job.w = w, job.bias = w + job.c_pad * 27;
    for_each_sample(ctx, stem_sample, id[0], &job);
    free(w);
    return job.failed ? "ganet.ops::Stem: out of memory" : NULL;
}

static const char *run_any(const GroupAttentionKernel *k, OrtKernelContext *ctx) {
    return k->mode == MODE_STEM ? run_stem(ctx) : run_node(k, ctx);
}

static void compute(void *kernel, OrtKernelContext *ctx) { (void)run_any(kernel, ctx); }

static OrtStatus *compute_v2(void *kernel, OrtKernelContext *ctx) {
    const char *error = run_any(kernel, ctx);
    return error ? API(g_api, CreateStatus)(ORT_INVALID_ARGUMENT, error) : NULL;
}

static void destroy_kernel(void *kernel) { free(kernel); }
static const char *op_name(const OrtCustomOp *op) { return ((const GanetOp *)op)->name; }
static const char *op_provider(const OrtCustomOp *op) { (void)op; return "CPUExecutionProvider"; }
static int op_input_type(const OrtCustomOp *op, size_t i) {
    return i == 0 ? ((const GanetOp *)op)->input0_type : ORT_ELEMENT_FLOAT;
}
static int op_output_type(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return ORT_ELEMENT_FLOAT; }
static size_t op_inputs(const OrtCustomOp *op) { return ((const GanetOp *)op)->inputs; }
static size_t op_outputs(const OrtCustomOp *op) { return ((const GanetOp *)op)->outputs; }
static int op_required(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return 0; } /* INPUT_OUTPUT_REQUIRED */
static int op_memory(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return 0; }   /* OrtMemTypeDefault */
static int op_one(const OrtCustomOp *op) { (void)op; return 1; } /* variadic arity: unused, no input is variadic */

#define GANET_OP(MODE, NAME, INPUTS, OUTPUTS, INPUT0_TYPE)                                                       \
    {{ORT_API_VERSION_USED, create_kernel, op_name, op_provider, op_input_type, op_inputs, op_output_type,        \
      op_outputs, compute,                                                                                         \
      destroy_kernel, op_required, op_required, op_memory, op_one, op_one, op_one, op_one, NULL, compute_v2},       \
     MODE, NAME, INPUTS, OUTPUTS, INPUT0_TYPE}
static GanetOp kOps[] = { /* (not const: RegisterCustomOps sets the version the runtime serves); the header's I/O */
    GANET_OP(MODE_PLAIN, "GroupAttention", 4, 1, ORT_ELEMENT_FLOAT),
    GANET_OP(MODE_SHUFFLE, "GroupAttentionShuffle", 5, 1, ORT_ELEMENT_FLOAT),
    GANET_OP(MODE_SHUFFLE_SPLIT, "GroupAttentionShuffleSplit", 5, 2, ORT_ELEMENT_FLOAT),
    GANET_OP(MODE_STEM, "Stem", 5, 1, ORT_ELEMENT_UINT8),
};
#undef GANET_OP

/* The entry point OrtApi::RegisterCustomOpsLibrary (Python: SessionOptions.register_custom_ops_library) calls. */
__attribute__((visibility("default"))) OrtStatus *RegisterCustomOps(OrtSessionOptions *options,
                                                                    const OrtApiBase *base) {
    g_api = base->GetApi(ORT_API_VERSION_USED);
    if (!g_api) return NULL; /* cannot happen: every ONNX Runtime since 1.13 serves version 13 */
    /* A library built for newer instructions (python -m ganet.kernels --march x86-64-v3) refuses to load on a CPU
     * without them instead of dying of SIGILL in the first run; the caller then serves the standard graph. */
#if defined(__x86_64__) && defined(__AVX512F__)
    if (!__builtin_cpu_supports("avx512f"))
        return API(g_api, CreateStatus)(ORT_FAIL, "libganet_ops.so was built for AVX-512; this CPU lacks it");
#endif
#if defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__)
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma"))
        return API(g_api, CreateStatus)(ORT_FAIL, "libganet_ops.so was built for AVX2 + FMA; this CPU lacks them");
#endif
    g_has_parallel_for = base->GetApi(17) != NULL;
    const uint32_t version = base->GetApi(ORT_API_VERSION_COMPUTE_V2) ? ORT_API_VERSION_COMPUTE_V2 : ORT_API_VERSION_USED;
    OrtCustomOpDomain *domain = NULL;
    OrtStatus *st = API(g_api, CreateCustomOpDomain)(kDomain, &domain);
    if (st) return st;
    for (size_t i = 0; i < sizeof kOps / sizeof kOps[0]; ++i) {
        kOps[i].base.version = version;
        st = API(g_api, CustomOpDomainAdd)(domain, &kOps[i].base);
        if (st) return st;
    }
    return API(g_api, AddCustomOpDomain)(options, domain);
}
