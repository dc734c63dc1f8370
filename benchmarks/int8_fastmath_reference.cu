// An INT8 Conv1D+SiLU kernel written the way deployed kernels are (int8 codes in and out, integer
// accumulation, fp32 epilogue with divisions and expf in the source), to be compiled with
// `nvcc -O3 --use_fast_math`: the reference `kernel_math=fast` must match bit for bit.
// Not part of the package: benchmarks/int8_fastmath_check.py builds it on a GPU machine.
//
// x: (batch, length + 3, channels) int8 codes, channels-last, the 3 positions before each sequence
// first (zeros at a sequence start); w: (channels, 4); bias: (channels,) int8 codes;
// out: (batch, length, channels) int8 codes.
#include <torch/extension.h>
#include <cstdint>

__global__ void int8_conv_silu_kernel(const int8_t* __restrict__ x, const int8_t* __restrict__ w,
                                      const int8_t* __restrict__ bias, float scale_wx, float scale_b,
                                      float scale_out, int8_t* __restrict__ out, int length, int channels) {
    const int d = blockIdx.x * blockDim.x + threadIdx.x;
    const int t = blockIdx.y;
    const int b = blockIdx.z;
    if (d >= channels) return;
    const int8_t* window = x + ((size_t)b * (length + 3) + t) * channels + d;
    int acc = 0;
    #pragma unroll
    for (int k = 0; k < 4; ++k) acc += (int)w[d * 4 + k] * (int)window[(size_t)k * channels];
    float v = scale_wx * (float)acc + scale_b * (float)bias[d];
    float y = v / (1.0f + expf(-v));
    float q = roundf(y / scale_out);
    q = fminf(fmaxf(q, -128.0f), 127.0f);
    out[((size_t)b * length + t) * channels + d] = (int8_t)q;
}

torch::Tensor int8_conv_silu(torch::Tensor x, torch::Tensor w, torch::Tensor bias, double scale_wx,
                             double scale_b, double scale_out) {
    const int batch = x.size(0), length = x.size(1) - 3, channels = x.size(2);
    auto out = torch::empty({batch, length, channels}, x.options());
    const int threads = 128;
    dim3 grid((channels + threads - 1) / threads, length, batch);
    int8_conv_silu_kernel<<<grid, threads>>>(x.data_ptr<int8_t>(), w.data_ptr<int8_t>(), bias.data_ptr<int8_t>(),
                                             (float)scale_wx, (float)scale_b, (float)scale_out,
                                             out.data_ptr<int8_t>(), length, channels);
    return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("int8_conv_silu", &int8_conv_silu); }
