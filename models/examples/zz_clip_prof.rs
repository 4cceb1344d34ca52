use candle_core::{Device, IndexOp, Tensor};
fn cpu() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap();
    let r = s.rsplit_once(')').unwrap().1;
    let f: Vec<&str> = r.split_whitespace().collect();
    (f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()) as f64 * 10.0
}
fn t<F: FnMut() -> candle_core::Result<Tensor>>(
    name: &str,
    n: usize,
    mut f: F,
) -> candle_core::Result<()> {
    f()?;
    let a = cpu();
    for _ in 0..n {
        f()?;
    }
    let b = cpu();
    println!("{name:30} {:8.2} ms cpu", (b - a) / n as f64);
    Ok(())
}
fn main() -> candle_core::Result<()> {
    let d = Device::Cpu;
    let (b, n, dim, h) = (1usize, 197usize, 768usize, 12usize);
    let hd = dim / h;
    let x = Tensor::randn(0f32, 1.0, (b * n, dim), &d)?;
    let wqkv = Tensor::randn(0f32, 0.02, (3 * dim, dim), &d)?;
    let bqkv = Tensor::randn(0f32, 0.02, 3 * dim, &d)?;
    let w1 = Tensor::randn(0f32, 0.02, (3072, dim), &d)?;
    let w2 = Tensor::randn(0f32, 0.02, (dim, 3072), &d)?;
    let wo = Tensor::randn(0f32, 0.02, (dim, dim), &d)?;
    let lnw = Tensor::ones(dim, candle_core::DType::F32, &d)?;
    let lnb = Tensor::zeros(dim, candle_core::DType::F32, &d)?;
    let ln = candle_nn::LayerNorm::new(lnw, lnb, 1e-5);
    use candle_nn::Module;
    let r = 100;
    t("layernorm", r, || ln.forward(&x.reshape((1, n, dim))?))?;
    t("qkv matmul", r, || x.matmul(&wqkv.t()?))?;
    let y = x.matmul(&wqkv.t()?)?;
    t("qkv bias add", r, || y.broadcast_add(&bqkv))?;
    let qkv = y.reshape((b, n, 3, h, hd))?.permute((2, 0, 3, 1, 4))?;
    t("q scale", r, || (qkv.i(0)? * 0.125))?;
    t("k contig", r, || qkv.i(1)?.contiguous())?;
    let q = (qkv.i(0)? * 0.125)?.reshape((b * h, n, hd))?;
    let k = qkv.i(1)?.contiguous()?.reshape((b * h, n, hd))?;
    let v = qkv.i(2)?.contiguous()?.reshape((b * h, n, hd))?;
    t("q k^T", r, || q.matmul(&k.t()?))?;
    let s = q.matmul(&k.t()?)?;
    t("softmax", r, || candle_nn::ops::softmax_last_dim(&s))?;
    let p = candle_nn::ops::softmax_last_dim(&s)?;
    t("p v", r, || p.matmul(&v))?;
    let o = p.matmul(&v)?;
    t("ctx transpose", r, || {
        o.reshape((b, h, n, hd))?
            .transpose(1, 2)?
            .reshape((b * n, dim))
    })?;
    t("out proj", r, || x.matmul(&wo.t()?))?;
    t("fc1", r, || x.matmul(&w1.t()?))?;
    let hid = x.matmul(&w1.t()?)?;
    t("quickgelu", r, || {
        &hid * candle_nn::ops::sigmoid(&(&hid * 1.702)?)?
    })?;
    t("  mul", r, || &hid * 1.702)?;
    t("  sigmoid", r, || candle_nn::ops::sigmoid(&hid))?;
    t("  mul2", r, || &hid * &hid)?;
    t("fc2", r, || hid.matmul(&w2.t()?))?;
    t("residual add", r, || &x + &x)?;
    Ok(())
}
