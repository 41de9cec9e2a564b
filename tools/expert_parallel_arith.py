#!/usr/bin/env python3
# The arithmetic of docs/expert-parallel.md: experts per node, wire bytes per
# token and layer, and the link speed below which decode is network-bound,
# for DeepSeek-V3 and Qwen3-235B-A22B (public model-card sizes).
import math
def model(name,E,k,d,F,L_moe,dense_active_b, bw_mem=200e9, N=8, bpp=34/32):
    pe = 3*d*F                     # params per expert
    be = pe*bpp                    # bytes per expert (q8_0)
    print(f"== {name}: expert {pe/1e6:.1f} M params, {be/1e6:.1f} MB q8_0; routed total {E*pe*L_moe/1e9:.0f} B params = {E*pe*L_moe*bpp/1e9:.0f} GB q8_0")
    for n in (2,4,8,16):
        print(f"  N={n}: {E/n:.0f} experts per node per layer, routed {E*pe*L_moe*bpp/1e9/n:.0f} GB per node")
    row=d*4
    print(f"  wire per token per layer: k*d*4 = {k*row/1e3:.0f} KB each way f32 ({k*row/2e3:.0f} KB bf16); all {L_moe} MoE layers round trip {2*k*row*L_moe/1e6:.1f} MB f32")
    print(f"  per assignment: {2*pe/1e6:.1f} MFLOP vs {2*row/1e3:.1f} KB on the wire: {2*pe/(2*row):.0f} FLOP/byte f32")
    for B in (1,16,64,256,1024):
        hit = E*(1-(1-k/E)**B)
        mem = hit/N*be                 # bytes streamed per node per layer
        wire = B*k/N*(N-1)/N*2*row     # bytes on one node's link per layer (in+out)
        t_mem = mem/bw_mem
        bw_star = wire/t_mem
        print(f"  N={N} B={B:5d}: experts hit {hit:5.1f}/layer, per node {mem/1e6:7.1f} MB weights ({t_mem*1e3:.2f} ms at {bw_mem/1e9:.0f} GB/s), {wire/1e6:6.3f} MB on the wire; network-bound below {bw_star/1e9:6.2f} GB/s = {bw_star*8/1e9:6.1f} Gb/s")
model("DeepSeek-V3",256,8,7168,2048,58,0)
model("Qwen3-235B-A22B",128,8,4096,1536,94,0)
