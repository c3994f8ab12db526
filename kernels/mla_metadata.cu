// mla_metadata.cu -- the split-KV scheduler plan (mla/scheduler.py `plan`) computed on the device.
//
// Same output, bit for bit, as the NumPy version: tile_scheduler_metadata int32 [num_workers, 8]
// = [begin_b, begin_token, end_b, end_token, begin_split, 0, 0, 0] and num_splits int32 [b + 1]
// (cumulative). Computing it on the GPU keeps flash_mla_with_kvcache free of host syncs, so a
// decode loop whose lengths live on the device can be captured in a CUDA graph; the plan is
// reused across layers while the lengths stay the same.
//
// One CTA: its threads sum the tiles of all sequences (the payload needs the total), then thread
// 0 walks the sequences, dealing each worker `payload` tiles (O(b + num_workers), a few
// microseconds for the batch sizes of decoding). tight != 0: first the smallest payload from
// ceil(total / num_workers) up whose deal covers every sequence (at most fixed_overhead + 1 dry walks;
// mla/scheduler.py `plan`, `tight`).
constexpr int THREADS = 256;

// deal `payload` a worker; write the plan when `write`; whether the workers covered every sequence
__device__ bool mla_deal(const int* __restrict__ seqlens, int b, int num_workers, int block_n, int fixed_overhead,
                         long long payload, bool write, int* __restrict__ metadata, int* __restrict__ num_splits) {
  if (write) num_splits[0] = 0;
  int seq = 0, cum = 0;
  long long tile = 0;
  int split = 0;
  for (int w = 0; w < num_workers; ++w) {
    const int begin_b = seq, begin_split = split;
    const long long begin_token = tile * block_n;
    long long budget = payload;
    while (seq < b) {
      const long long remaining = (seqlens[seq] + block_n - 1) / block_n - tile;
      if (budget >= remaining + fixed_overhead) {  // the rest of this sequence fits
        cum += split + 1;
        if (write) num_splits[seq + 1] = cum;
        budget -= remaining + fixed_overhead;
        ++seq;
        tile = 0;
        split = 0;
      } else {  // take what the budget allows; the next worker continues
        if (budget > fixed_overhead) {
          tile += budget - fixed_overhead;
          ++split;
        }
        break;
      }
    }
    if (!write) continue;
    int end_b, end_token;
    if (tile > 0) {
      end_b = seq;
      end_token = (int)(tile * block_n);
    } else {
      end_b = seq - 1;
      end_token = end_b >= 0 ? seqlens[end_b] : 0;
    }
    int* row = metadata + w * 8;
    row[0] = begin_b;
    row[1] = (int)begin_token;
    row[2] = end_b;
    row[3] = end_token;
    row[4] = begin_split;
    row[5] = row[6] = row[7] = 0;
  }
  return seq >= b;
}

extern "C" __global__ void __launch_bounds__(THREADS)
mla_plan(const int* __restrict__ seqlens, int b, int num_workers, int block_n, int fixed_overhead, int tight,
         int* __restrict__ metadata, int* __restrict__ num_splits) {
  __shared__ long long partial[THREADS];
  long long tiles = 0;
  for (int i = threadIdx.x; i < b; i += THREADS) tiles += (seqlens[i] + block_n - 1) / block_n;
  partial[threadIdx.x] = tiles;
  __syncthreads();
  for (int s = THREADS / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x != 0) return;
  const long long total = partial[0] + (long long)b * fixed_overhead;
  const long long loose = (total + num_workers - 1) / num_workers + fixed_overhead;  // always covers
  long long payload = tight ? (total + num_workers - 1) / num_workers : loose;
  while (payload < loose &&
         !mla_deal(seqlens, b, num_workers, block_n, fixed_overhead, payload, false, metadata, num_splits))
    ++payload;
  mla_deal(seqlens, b, num_workers, block_n, fixed_overhead, payload, true, metadata, num_splits);
}
