// Fused causal attention on tensor cores (mma.sync m16n8k16, bf16 or f16 in, f32 accumulate), FlashAttention-2
// style: the T×T scores never leave registers. Included by attention_cuda.rs after the shared prelude.
//
// Layout: qkv [b, t, nh + 2·nkv, hd] (the QKV projection's output: query heads, then key heads, then value
// heads; grouped-query attention when nkv < nh, query head h reading key/value head h / (nh / nkv)), y and dy [b, t, nh, hd],
// lse and delta [b, nh, t] f32. A block is 4 warps; a warp owns 16 rows (queries in the forward and dQ
// kernels, keys in the dK/dV kernel), the block 64, and it walks the other side in tiles of 64 through
// shared memory. Fragment layouts are those of the PTX ISA for m16n8k16: with g = lane / 4, c = lane % 4,
// A holds rows g and g + 8, columns 2c, 2c + 1 (+ 8); B holds column g, rows 2c, 2c + 1 (+ 8); C holds rows
// g and g + 8, columns 2c, 2c + 1. A C fragment pair is the A fragment of the next product (P·V, dS·K).
// Every sum runs in a fixed order: no atomics, the results are repeatable bit for bit.
//
// Packed batches (DOCS = 1): starts [b, t] u32 gives the row where each token's document begins; query i sees
// keys starts[i] ..= i only. starts never decreases along a row, so a block's first row has its smallest start
// (the forward and dQ kernels begin at that key tile) and the dK/dV kernel stops at the first query tile whose
// first row starts after the block's last key. A row whose keys so far are all masked keeps max = −∞ and adds
// nothing (exp2 against 0, not −∞ − −∞).

#define TILE 64
#define PAD 8
typedef unsigned short u16;

__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
  unsigned r; asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo)); return r; }
__device__ __forceinline__ unsigned pack_f16(float lo, float hi) {
  unsigned r; asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo)); return r; }
__device__ __forceinline__ void mma_bf16(float* d, const unsigned* a, unsigned b0, unsigned b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
    : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1)); }
__device__ __forceinline__ void mma_f16(float* d, const unsigned* a, unsigned b0, unsigned b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
    : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1)); }
// The bf16 (BF) or f16 versions, chosen at compile time.
template <bool BF> __device__ __forceinline__ unsigned pack(float lo, float hi) { return BF ? pack_bf16(lo, hi) : pack_f16(lo, hi); }
template <bool BF> __device__ __forceinline__ void mma(float* d, const unsigned* a, unsigned b0, unsigned b1) {
  if (BF) mma_bf16(d, a, b0, b1); else mma_f16(d, a, b0, b1); }
__device__ __forceinline__ unsigned ld32(const u16* p) { return *(const unsigned*)p; }
__device__ __forceinline__ float ld_half(u16 h, bool bf) { return bf ? ld_bf16(h) : ld_f16(h); }

// A fragments of 16 rows × HD columns of a row-major matrix in global memory (rows at or past `rows` read 0).
template <int HD>
__device__ __forceinline__ void load_a(unsigned (*a)[4], const u16* base, long stride, int r0, int rows) {
  int g = (threadIdx.x & 31) >> 2, c = threadIdx.x & 3;
  const u16* p0 = base + (long)(r0 + g) * stride; const u16* p1 = p0 + 8 * stride;
  bool ok0 = r0 + g < rows, ok1 = r0 + g + 8 < rows;
#pragma unroll
  for (int k = 0; k < HD / 16; k++) {
    int col = k * 16 + 2 * c;
    a[k][0] = ok0 ? ld32(p0 + col) : 0u; a[k][1] = ok1 ? ld32(p1 + col) : 0u;
    a[k][2] = ok0 ? ld32(p0 + col + 8) : 0u; a[k][3] = ok1 ? ld32(p1 + col + 8) : 0u;
  }
}

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  unsigned a; asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p)); return a; }

// TILE rows × HD columns from global (row stride `stride`, rows from `r0`, zero past `rows`) into shared,
// asynchronously (cp.async, 16 bytes at a time): complete after cp_wait and a barrier.
template <int HD>
__device__ __forceinline__ void load_tile(u16 (*s)[HD + PAD], const u16* base, long stride, int r0, int rows) {
  for (int i = threadIdx.x; i < TILE * HD / 8; i += blockDim.x) {
    int r = i / (HD / 8), col = (i % (HD / 8)) * 8;
    bool ok = r0 + r < rows;
    const u16* src = base + (long)(ok ? r0 + r : 0) * stride + col;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(smem_addr(&s[r][col])), "l"(src), "r"(ok ? 16 : 0));
  }
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;"); }
template <int N> __device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N)); }
// Shared-memory buffers per operand: two (the next tile loads while this one computes) where they fit in the
// 48 KiB of static shared memory.
#define STAGES(HD) ((HD) <= 64 ? 2 : 1)

// Four 8×8 b16 matrices from shared memory, lane l giving the address of row l % 8 of matrix l / 8; with
// .trans each lane receives a column pair instead of a row pair (the B fragment of a row-major k × n tile).
__device__ __forceinline__ void ldsm_x4(unsigned* r, const u16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
    : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p))); }
__device__ __forceinline__ void ldsm_x4_t(unsigned* r, const u16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
    : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p))); }

// acc[n] (16 × TILE) = A (16 × HD, fragments) · Sᵀ where S is TILE × HD in shared memory (row n·8 + g).
// One ldmatrix gives the B fragments of two k-steps: matrices (rows n·8.., columns 16k, 16k + 8, 16k + 16, 16k + 24).
template <int HD, bool BF>
__device__ __forceinline__ void mma_abt(float (*acc)[4], unsigned (*a)[4], u16 (*s)[HD + PAD]) {
  int lane = threadIdx.x & 31;
#pragma unroll
  for (int n = 0; n < TILE / 8; n++) {
    acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
#pragma unroll
    for (int k = 0; k < HD / 16; k += 2) {
      unsigned b[4];
      ldsm_x4(b, &s[n * 8 + (lane & 7)][k * 16 + (lane >> 3) * 8]);
      mma<BF>(acc[n], a[k], b[0], b[1]); mma<BF>(acc[n], a[k + 1], b[2], b[3]);
    }
  }
}

// out[n] (16 × HD) += P (16 × TILE, C fragments in f32) · S where S is TILE × HD in shared memory.
// One transposing ldmatrix gives the B fragments of two n-tiles: matrices (rows 16k.., 16k + 8..) × (columns 8n, 8n + 8).
template <int HD, bool BF>
__device__ __forceinline__ void mma_pb(float (*out)[4], float (*p)[4], u16 (*s)[HD + PAD]) {
  int lane = threadIdx.x & 31;
#pragma unroll
  for (int k = 0; k < TILE / 16; k++) {
    unsigned a[4] = { pack<BF>(p[2 * k][0], p[2 * k][1]), pack<BF>(p[2 * k][2], p[2 * k][3]),
                      pack<BF>(p[2 * k + 1][0], p[2 * k + 1][1]), pack<BF>(p[2 * k + 1][2], p[2 * k + 1][3]) };
#pragma unroll
    for (int n = 0; n < HD / 8; n += 2) {
      unsigned b[4];
      ldsm_x4_t(b, &s[k * 16 + (lane & 7) + ((lane >> 3) & 1) * 8][(n + (lane >> 4)) * 8]);
      mma<BF>(out[n], a, b[0], b[1]); mma<BF>(out[n + 1], a, b[2], b[3]);
    }
  }
}

// Store 16 × HD f32 C fragments (times `scale`) as half rows of a row-major matrix (rows past `rows` skipped).
template <int HD, bool BF>
__device__ __forceinline__ void store_c(u16* base, long stride, int r0, int rows, float (*o)[4], float s0, float s1) {
  int g = (threadIdx.x & 31) >> 2, c = threadIdx.x & 3;
#pragma unroll
  for (int n = 0; n < HD / 8; n++) {
    int col = n * 8 + 2 * c;
    unsigned lo = pack<BF>(o[n][0] * s0, o[n][1] * s0), hi = pack<BF>(o[n][2] * s1, o[n][3] * s1);
    if (r0 + g < rows) *(unsigned*)(base + (long)(r0 + g) * stride + col) = lo;
    if (r0 + g + 8 < rows) *(unsigned*)(base + (long)(r0 + g + 8) * stride + col) = hi;
  }
}

// grid (ceil(t / 64), b·nh), 128 threads. y = softmax(q·kᵀ·scale, causal)·v; lse = log Σ exp (natural log).
template <int HD, bool BF>
__device__ void attn_fwd(const u16* qkv, u16* y, float* lse, const unsigned* starts, int docs, int T, int NH, int NKV, float scale) {
  constexpr int S = STAGES(HD);
  __shared__ __align__(16) u16 ks[S][TILE][HD + PAD];
  __shared__ __align__(16) u16 vs[S][TILE][HD + PAD];
  const int D = NH * HD; const long RS = (long)(NH + 2 * NKV) * HD;
  const int qt = gridDim.x - 1 - blockIdx.x, bh = blockIdx.y, b = bh / NH, h = bh % NH, kvh = h / (NH / NKV);
  const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, c = threadIdx.x & 3;
  const int q0 = qt * TILE + warp * 16;
  const float sl2 = scale * 1.4426950408889634f;
  const u16* base = qkv + (long)b * T * RS + h * HD;
  const u16* kb = qkv + (long)b * T * RS + (NH + kvh) * HD; const u16* vb = kb + NKV * HD;
  const unsigned* st = starts + (long)b * T;
  const int j0 = docs ? st[min(qt * TILE, T - 1)] / TILE : 0;
  const int st0 = docs && q0 + g < T ? st[q0 + g] : 0, st1 = docs && q0 + g + 8 < T ? st[q0 + g + 8] : 0;
  load_tile<HD>(ks[0], kb, RS, j0 * TILE, T); load_tile<HD>(vs[0], vb, RS, j0 * TILE, T); cp_commit();
  unsigned qa[HD / 16][4];
  load_a<HD>(qa, base, RS, q0, T);
  float o[HD / 8][4];
#pragma unroll
  for (int n = 0; n < HD / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;
  const int tiles = qt + 1;
  for (int j = j0; j < tiles; j++) {
    const int buf = (j - j0) % S;
    if (S == 2 && j + 1 < tiles) {
      load_tile<HD>(ks[(j + 1 - j0) % S], kb, RS, (j + 1) * TILE, T); load_tile<HD>(vs[(j + 1 - j0) % S], vb, RS, (j + 1) * TILE, T);
      cp_commit(); cp_wait<1>();
    } else cp_wait<0>();
    __syncthreads();
    float s[TILE / 8][4];
    mma_abt<HD, BF>(s, qa, ks[buf]);
    // Only the diagonal tile and the last one (keys past t) have masked entries, unless documents are packed.
    const bool edge = docs || j == qt || (j + 1) * TILE > T;
    float x0 = NEG_INF, x1 = NEG_INF;
#pragma unroll
    for (int n = 0; n < TILE / 8; n++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        int row = q0 + g + (e >> 1) * 8, key = j * TILE + n * 8 + 2 * c + (e & 1);
        float v = (edge && (key > row || key >= T || key < (e >> 1 ? st1 : st0))) ? NEG_INF : s[n][e] * sl2;
        s[n][e] = v;
        if (e < 2) x0 = fmaxf(x0, v); else x1 = fmaxf(x1, v);
      }
    x0 = fmaxf(x0, __shfl_xor_sync(0xffffffff, x0, 1)); x0 = fmaxf(x0, __shfl_xor_sync(0xffffffff, x0, 2));
    x1 = fmaxf(x1, __shfl_xor_sync(0xffffffff, x1, 1)); x1 = fmaxf(x1, __shfl_xor_sync(0xffffffff, x1, 2));
    float n0 = fmaxf(m0, x0), n1 = fmaxf(m1, x1);
    const float u0 = n0 == NEG_INF ? 0.f : n0, u1 = n1 == NEG_INF ? 0.f : n1;
    float a0 = exp2f(m0 - u0), a1 = exp2f(m1 - u1);
    m0 = n0; m1 = n1;
    float r0 = 0.f, r1 = 0.f;
#pragma unroll
    for (int n = 0; n < TILE / 8; n++) {
      s[n][0] = exp2f(s[n][0] - u0); s[n][1] = exp2f(s[n][1] - u0);
      s[n][2] = exp2f(s[n][2] - u1); s[n][3] = exp2f(s[n][3] - u1);
      r0 += s[n][0] + s[n][1]; r1 += s[n][2] + s[n][3];
    }
    l0 = l0 * a0 + r0; l1 = l1 * a1 + r1;
#pragma unroll
    for (int n = 0; n < HD / 8; n++) { o[n][0] *= a0; o[n][1] *= a0; o[n][2] *= a1; o[n][3] *= a1; }
    mma_pb<HD, BF>(o, s, vs[buf]);
    __syncthreads();  // every warp is done with this buffer before it is loaded again
    if (S == 1 && j + 1 < tiles) {
      load_tile<HD>(ks[0], kb, RS, (j + 1) * TILE, T); load_tile<HD>(vs[0], vb, RS, (j + 1) * TILE, T); cp_commit();
    }
  }
  l0 += __shfl_xor_sync(0xffffffff, l0, 1); l0 += __shfl_xor_sync(0xffffffff, l0, 2);
  l1 += __shfl_xor_sync(0xffffffff, l1, 1); l1 += __shfl_xor_sync(0xffffffff, l1, 2);
  store_c<HD, BF>(y + (long)b * T * D + h * HD, D, q0, T, o, 1.f / l0, 1.f / l1);
  if (c == 0) {
    const float ln2 = 0.6931471805599453f;
    if (q0 + g < T) lse[(long)bh * T + q0 + g] = (m0 + log2f(l0)) * ln2;
    if (q0 + g + 8 < T) lse[(long)bh * T + q0 + g + 8] = (m1 + log2f(l1)) * ln2;
  }
}

// delta[b, h, t] = Σ_d dy·y over one head's row: one warp per (row, head), rows in [b, t, nh] order.
template <int HD, bool BF>
__device__ void attn_delta(const u16* y, const u16* dy, float* delta, int T, int NH, long rows) {
  long r = (blockIdx.x * (long)blockDim.x + threadIdx.x) >> 5; int lane = threadIdx.x & 31;
  if (r >= rows) return;
  float s = 0.f;
  for (int d = lane; d < HD; d += 32) s += ld_half(y[r * HD + d], BF) * ld_half(dy[r * HD + d], BF);
  s = warp_sum(s);
  long bt = r / NH; int h = r % NH; long b = bt / T; int t = bt % T;
  if (lane == 0) delta[(b * NH + h) * T + t] = s;
}

// grid (ceil(t / 64), b·nh), 128 threads: dq = scale · dS·k with dS = P ∘ (dP − delta), dP = dy·vᵀ.
template <int HD, bool BF>
__device__ void attn_bwd_dq(const u16* qkv, const u16* dy, const float* lse, const float* delta, u16* dqkv, const unsigned* starts, int docs, int T, int NH, int NKV, float scale) {
  constexpr int S = STAGES(HD);
  __shared__ __align__(16) u16 ks[S][TILE][HD + PAD];
  __shared__ __align__(16) u16 vs[S][TILE][HD + PAD];
  const int D = NH * HD; const long RS = (long)(NH + 2 * NKV) * HD;
  const int qt = gridDim.x - 1 - blockIdx.x, bh = blockIdx.y, b = bh / NH, h = bh % NH, kvh = h / (NH / NKV);
  const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, c = threadIdx.x & 3;
  const int q0 = qt * TILE + warp * 16;
  const float sl2 = scale * 1.4426950408889634f, l2e = 1.4426950408889634f;
  const u16* base = qkv + (long)b * T * RS + h * HD;
  const u16* kb = qkv + (long)b * T * RS + (NH + kvh) * HD; const u16* vb = kb + NKV * HD;
  const unsigned* st = starts + (long)b * T;
  const int j0 = docs ? st[min(qt * TILE, T - 1)] / TILE : 0;
  const int sts[2] = { docs && q0 + g < T ? (int)st[q0 + g] : 0, docs && q0 + g + 8 < T ? (int)st[q0 + g + 8] : 0 };
  load_tile<HD>(ks[0], kb, RS, j0 * TILE, T); load_tile<HD>(vs[0], vb, RS, j0 * TILE, T); cp_commit();
  unsigned qa[HD / 16][4], da[HD / 16][4];
  load_a<HD>(qa, base, RS, q0, T);
  load_a<HD>(da, dy + (long)b * T * D + h * HD, D, q0, T);
  float L[2], Dl[2];
  for (int i = 0; i < 2; i++) {
    int row = q0 + g + 8 * i;
    L[i] = row < T ? lse[(long)bh * T + row] * l2e : 0.f; Dl[i] = row < T ? delta[(long)bh * T + row] : 0.f;
  }
  float dq[HD / 8][4];
#pragma unroll
  for (int n = 0; n < HD / 8; n++) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.f;
  for (int j = j0; j <= qt; j++) {
    const int buf = (j - j0) % S;
    if (S == 2 && j < qt) {
      load_tile<HD>(ks[(j + 1 - j0) % S], kb, RS, (j + 1) * TILE, T); load_tile<HD>(vs[(j + 1 - j0) % S], vb, RS, (j + 1) * TILE, T);
      cp_commit(); cp_wait<1>();
    } else cp_wait<0>();
    __syncthreads();
    float s[TILE / 8][4], dp[TILE / 8][4];
    mma_abt<HD, BF>(s, qa, ks[buf]);
    mma_abt<HD, BF>(dp, da, vs[buf]);
    const bool edge = docs || j == qt || (j + 1) * TILE > T;
#pragma unroll
    for (int n = 0; n < TILE / 8; n++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        int i = e >> 1, row = q0 + g + 8 * i, key = j * TILE + n * 8 + 2 * c + (e & 1);
        float p = (edge && (key > row || key >= T || key < sts[i])) ? 0.f : exp2f(s[n][e] * sl2 - L[i]);
        s[n][e] = p * (dp[n][e] - Dl[i]);
      }
    mma_pb<HD, BF>(dq, s, ks[buf]);
    __syncthreads();
    if (S == 1 && j < qt) {
      load_tile<HD>(ks[0], kb, RS, (j + 1) * TILE, T); load_tile<HD>(vs[0], vb, RS, (j + 1) * TILE, T); cp_commit();
    }
  }
  store_c<HD, BF>(dqkv + (long)b * T * RS + h * HD, RS, q0, T, dq, scale, scale);
}

// grid (ceil(t / 64), b·nkv), 128 threads, a warp owning 16 keys: dv = Pᵀ·dy, dk = scale · dSᵀ·q, summed
// over the query heads that read this key/value head, in head order (so the sums repeat bit for bit).
template <int HD, bool BF>
__device__ void attn_bwd_dkv(const u16* qkv, const u16* dy, const float* lse, const float* delta, u16* dqkv, const unsigned* starts, int docs, int T, int NH, int NKV, float scale) {
  constexpr int S = STAGES(HD);
  __shared__ __align__(16) u16 qs[S][TILE][HD + PAD];
  __shared__ __align__(16) u16 dys[S][TILE][HD + PAD];
  __shared__ float ls[S][TILE], dls[S][TILE];
  __shared__ int sts[S][TILE];
  const int D = NH * HD; const long RS = (long)(NH + 2 * NKV) * HD; const int G = NH / NKV;
  const int kt = blockIdx.x, b = blockIdx.y / NKV, kvh = blockIdx.y % NKV;
  const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, c = threadIdx.x & 3;
  const int k0 = kt * TILE + warp * 16;
  const float sl2 = scale * 1.4426950408889634f, l2e = 1.4426950408889634f;
  const u16* kb = qkv + (long)b * T * RS + (NH + kvh) * HD; const u16* vb = kb + NKV * HD;
  unsigned ka[HD / 16][4], va[HD / 16][4];
  load_a<HD>(ka, kb, RS, k0, T);
  load_a<HD>(va, vb, RS, k0, T);
  float dk[HD / 8][4], dv[HD / 8][4];
#pragma unroll
  for (int n = 0; n < HD / 8; n++) { dk[n][0] = dk[n][1] = dk[n][2] = dk[n][3] = 0.f; dv[n][0] = dv[n][1] = dv[n][2] = dv[n][3] = 0.f; }
  const unsigned* st = starts + (long)b * T;
  int tiles = (T + TILE - 1) / TILE;
  if (docs) {
    const int last_key = min(kt * TILE + TILE - 1, T - 1);
    for (int i = kt + 1; i < tiles; i++) if ((int)st[i * TILE] > last_key) { tiles = i; break; }
  }
  for (int h = kvh * G; h < (kvh + 1) * G; h++) {
    const long bh = (long)b * NH + h;
    const u16* base = qkv + (long)b * T * RS + h * HD;
    const u16* dyb = dy + (long)b * T * D + h * HD;
    // Query tile i into buffer `buf`: q and dy asynchronously, the row statistics directly.
    auto issue = [&](int i, int buf) {
      load_tile<HD>(qs[buf], base, RS, i * TILE, T); load_tile<HD>(dys[buf], dyb, D, i * TILE, T); cp_commit();
      for (int r = threadIdx.x; r < TILE; r += blockDim.x) {
        int row = i * TILE + r;
        ls[buf][r] = row < T ? lse[bh * T + row] * l2e : 0.f; dls[buf][r] = row < T ? delta[bh * T + row] : 0.f;
        sts[buf][r] = docs && row < T ? (int)st[row] : 0;
      }
    };
    issue(kt, 0);
    for (int i = kt; i < tiles; i++) {
      const int buf = (i - kt) % S;
      if (S == 2 && i + 1 < tiles) { issue(i + 1, (i + 1 - kt) % S); cp_wait<1>(); } else cp_wait<0>();
      __syncthreads();
      float p[TILE / 8][4], dp[TILE / 8][4];
      mma_abt<HD, BF>(p, ka, qs[buf]);
      mma_abt<HD, BF>(dp, va, dys[buf]);
      const bool edge = docs || i == kt || (i + 1) * TILE > T;
#pragma unroll
      for (int n = 0; n < TILE / 8; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
          int key = k0 + g + (e >> 1) * 8, qc = n * 8 + 2 * c + (e & 1), row = i * TILE + qc;
          float pv = (edge && (row < key || row >= T || key < sts[buf][qc])) ? 0.f : exp2f(p[n][e] * sl2 - ls[buf][qc]);
          p[n][e] = pv;
          dp[n][e] = pv * (dp[n][e] - dls[buf][qc]);
        }
      mma_pb<HD, BF>(dv, p, dys[buf]);
      mma_pb<HD, BF>(dk, dp, qs[buf]);
      __syncthreads();
      if (S == 1 && i + 1 < tiles) issue(i + 1, 0);
    }
  }
  u16* out = dqkv + (long)b * T * RS + (NH + kvh) * HD;
  store_c<HD, BF>(out, RS, k0, T, dk, scale, scale);
  store_c<HD, BF>(out + NKV * HD, RS, k0, T, dv, 1.f, 1.f);
}

#define ATTN_KERNELS(HD, NAME, BF) \
extern "C" __global__ void __launch_bounds__(128) attn_fwd_##NAME##_##HD(const u16* qkv, u16* y, float* lse, const unsigned* starts, int docs, int T, int NH, int NKV, float scale) { \
  attn_fwd<HD, BF>(qkv, y, lse, starts, docs, T, NH, NKV, scale); } \
extern "C" __global__ void attn_delta_##NAME##_##HD(const u16* y, const u16* dy, float* delta, int T, int NH, long rows) { \
  attn_delta<HD, BF>(y, dy, delta, T, NH, rows); } \
extern "C" __global__ void __launch_bounds__(128) attn_bwd_dq_##NAME##_##HD(const u16* qkv, const u16* dy, const float* lse, const float* delta, u16* dqkv, const unsigned* starts, int docs, int T, int NH, int NKV, float scale) { \
  attn_bwd_dq<HD, BF>(qkv, dy, lse, delta, dqkv, starts, docs, T, NH, NKV, scale); } \
extern "C" __global__ void __launch_bounds__(128) attn_bwd_dkv_##NAME##_##HD(const u16* qkv, const u16* dy, const float* lse, const float* delta, u16* dqkv, const unsigned* starts, int docs, int T, int NH, int NKV, float scale) { \
  attn_bwd_dkv<HD, BF>(qkv, dy, lse, delta, dqkv, starts, docs, T, NH, NKV, scale); }
ATTN_KERNELS(32, bf16, true)
ATTN_KERNELS(64, bf16, true)
ATTN_KERNELS(128, bf16, true)
ATTN_KERNELS(32, f16, false)
ATTN_KERNELS(64, f16, false)
ATTN_KERNELS(128, f16, false)
