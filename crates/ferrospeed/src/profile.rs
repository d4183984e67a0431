//! Where the device's time goes, by kind of work: code marks spans (`let _s = profile::span(Kind::Matmul)`),
//! timed with CUDA events on the compute stream (the host clock on the CPU, where ops are synchronous).
//! The innermost span owns the time; what no span covers in a step is idle (or host work the device
//! waited for). Off unless [`start`] was called on the thread, so marking spans costs one
//! thread-local check in normal runs.

use candle_core::Device;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::Instant;

/// Kinds of work a step is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// Dense matrix products of the linear layers and the head (cuBLAS on the GPU).
    Matmul,
    /// The attention core: scores, causal softmax, weighted values, and their backward.
    Attention,
    /// LayerNorm, bias, GELU, residual adds, embedding lookups, the loss, dtype casts.
    Elementwise,
    /// Layout copies (head splits and merges) and host↔device transfers.
    Copy,
    /// Gradient norm, clipping, AdamW, writing the compute copy.
    Optimizer,
    /// Waiting for collectives (exposed communication).
    Communication,
}

impl Kind {
    pub const ALL: [Kind; 6] = [Kind::Matmul, Kind::Attention, Kind::Elementwise, Kind::Copy, Kind::Optimizer, Kind::Communication];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Matmul => "matmul",
            Kind::Attention => "attention",
            Kind::Elementwise => "elementwise",
            Kind::Copy => "copy",
            Kind::Optimizer => "optimizer",
            Kind::Communication => "communication",
        }
    }
}

/// Seconds per kind over the profiled interval, and the interval's wall time.
#[derive(Debug, Clone, Default)]
pub struct Breakdown {
    pub seconds: BTreeMap<Kind, f64>,
    /// Seconds per span label (finer than kinds: which op).
    pub by_label: BTreeMap<&'static str, f64>,
    pub wall: f64,
}

impl Breakdown {
    /// Wall time no span covers.
    pub fn idle(&self) -> f64 {
        (self.wall - self.seconds.values().sum::<f64>()).max(0.0)
    }
}

enum Mark {
    Host(Instant),
    #[cfg(feature = "cuda")]
    Event(candle_core::cuda::cudarc::driver::CudaEvent),
}

struct Profiler {
    #[cfg(feature = "cuda")]
    stream: Option<std::sync::Arc<candle_core::cuda::cudarc::driver::CudaStream>>,
    marks: Vec<Mark>,
    /// Kinds and labels of the open spans, innermost last.
    stack: Vec<(Kind, &'static str)>,
    /// The open segment: its kind, label and starting mark.
    open: Option<((Kind, &'static str), usize)>,
    segments: Vec<((Kind, &'static str), usize, usize)>,
    started: Instant,
    error: Option<String>,
}

impl Profiler {
    fn mark(&mut self) -> usize {
        #[cfg(feature = "cuda")]
        if let Some(stream) = &self.stream {
            use candle_core::cuda::cudarc::driver::sys::CUevent_flags;
            match stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)) {
                Ok(e) => self.marks.push(Mark::Event(e)),
                Err(e) => {
                    self.error.get_or_insert_with(|| format!("recording a CUDA event: {e}"));
                    self.marks.push(Mark::Host(Instant::now()));
                }
            }
            return self.marks.len() - 1;
        }
        self.marks.push(Mark::Host(Instant::now()));
        self.marks.len() - 1
    }

    fn push(&mut self, kind: (Kind, &'static str)) {
        let now = self.mark();
        if let Some((k, s)) = self.open.take() {
            self.segments.push((k, s, now));
        }
        self.stack.push(kind);
        self.open = Some((kind, now));
    }

    fn pop(&mut self) {
        let now = self.mark();
        if let Some((k, s)) = self.open.take() {
            self.segments.push((k, s, now));
        }
        self.stack.pop();
        self.open = self.stack.last().map(|&k| (k, now));
    }

    fn seconds(&self, a: usize, b: usize) -> Result<f64, String> {
        match (&self.marks[a], &self.marks[b]) {
            (Mark::Host(x), Mark::Host(y)) => Ok(y.duration_since(*x).as_secs_f64()),
            #[cfg(feature = "cuda")]
            (Mark::Event(x), Mark::Event(y)) => x.elapsed_ms(y).map(|ms| f64::from(ms) / 1e3).map_err(|e| e.to_string()),
            #[cfg(feature = "cuda")]
            _ => Err("a span mixes host and device marks".into()),
        }
    }
}

thread_local! {
    static PROFILER: RefCell<Option<Profiler>> = const { RefCell::new(None) };
}

/// Start profiling this thread's work on `device`; the device should be idle (synchronised).
pub fn start(device: &Device) {
    #[cfg(feature = "cuda")]
    let stream = match device {
        Device::Cuda(d) => Some(d.cuda_stream()),
        _ => None,
    };
    #[cfg(not(feature = "cuda"))]
    let _ = device;
    PROFILER.with(|p| {
        *p.borrow_mut() = Some(Profiler {
            #[cfg(feature = "cuda")]
            stream,
            marks: Vec::new(),
            stack: Vec::new(),
            open: None,
            segments: Vec::new(),
            started: Instant::now(),
            error: None,
        })
    });
}

/// Stop profiling; waits for the device and sums the spans. The wall time runs from [`start`] to the
/// moment the device finished (the caller synchronises the device before calling this).
pub fn finish() -> Result<Breakdown, String> {
    let Some(p) = PROFILER.with(|p| p.borrow_mut().take()) else {
        return Err("the profiler was not started on this thread".into());
    };
    if let Some(e) = p.error {
        return Err(e);
    }
    let wall = p.started.elapsed().as_secs_f64();
    let (mut seconds, mut by_label) = (BTreeMap::new(), BTreeMap::new());
    for &((kind, label), a, b) in &p.segments {
        let s = p.seconds(a, b)?;
        *seconds.entry(kind).or_insert(0.0) += s;
        *by_label.entry(label).or_insert(0.0) += s;
    }
    Ok(Breakdown { seconds, by_label, wall })
}

/// A span of work of one kind; ends when dropped.
#[must_use = "a span ends when it is dropped"]
pub struct Span(bool);

/// Attribute the work issued until the returned guard drops to `kind` (inner spans take precedence).
pub fn span(kind: Kind) -> Span {
    span_as(kind, kind.name())
}

/// A span of `kind` that also adds up under `label` (e.g. the op's name).
pub fn span_as(kind: Kind, label: &'static str) -> Span {
    Span(PROFILER.with(|p| p.borrow_mut().as_mut().map(|p| p.push((kind, label))).is_some()))
}

impl Drop for Span {
    fn drop(&mut self) {
        if self.0 {
            PROFILER.with(|p| {
                if let Some(p) = p.borrow_mut().as_mut() {
                    p.pop();
                }
            });
        }
    }
}

/// Run `f` inside a span of `kind`.
pub fn scoped<T>(kind: Kind, f: impl FnOnce() -> T) -> T {
    let _s = span(kind);
    f()
}

/// Run `f` inside a span of `kind` labelled `label`.
pub fn scoped_as<T>(kind: Kind, label: &'static str, f: impl FnOnce() -> T) -> T {
    let _s = span_as(kind, label);
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inner_spans_own_their_time_and_idle_is_the_rest() {
        use std::thread::sleep;
        use std::time::Duration;
        // Sleeps only promise a lower bound (a loaded machine may oversleep), so the checks relate the
        // profiler's numbers to the sleeps and to regions this test times itself, never to a ceiling.
        let ms = |n: u64| Duration::from_millis(n).as_secs_f64();
        // Clock readings in f64 seconds: a few ulps of slack for the sums.
        let eps = 1e-9;
        let before_start = Instant::now();
        start(&Device::Cpu);
        let outer_start = Instant::now();
        let inner;
        {
            let _outer = span(Kind::Elementwise);
            sleep(Duration::from_millis(20));
            let inner_start = Instant::now();
            {
                let _inner = span(Kind::Matmul);
                sleep(Duration::from_millis(30));
            }
            inner = inner_start.elapsed().as_secs_f64();
            sleep(Duration::from_millis(10));
        }
        let outer = outer_start.elapsed().as_secs_f64();
        sleep(Duration::from_millis(15));
        let b = finish().unwrap();
        let measured_wall = before_start.elapsed().as_secs_f64();
        let (mm, ew) = (b.seconds[&Kind::Matmul], b.seconds[&Kind::Elementwise]);
        assert_eq!(b.seconds.len(), 2, "only the two kinds that had spans: {:?}", b.seconds);
        assert!(mm >= ms(30) - eps && mm <= inner + eps, "matmul {mm}: at least its sleep, within the inner region {inner}");
        // The outer kind owns only its own sleeps: were the inner span's time counted for it as well,
        // matmul + elementwise would exceed the outer region by the inner span (30 ms or more).
        assert!(ew >= ms(20) + ms(10) - eps, "elementwise {ew}: at least the outer sleeps");
        assert!(mm + ew <= outer + eps, "matmul {mm} + elementwise {ew} exceed the outer region {outer}");
        assert!(b.idle() >= ms(15) - eps, "idle {}: at least the sleep outside every span", b.idle());
        assert!(b.wall <= measured_wall + eps, "wall {} exceeds the measured {measured_wall}", b.wall);
        assert!((b.wall - (mm + ew + b.idle())).abs() < eps, "spans + idle = wall");
    }

    #[test]
    fn spans_without_a_profiler_record_nothing() {
        let _s = span(Kind::Matmul);
        assert!(finish().is_err());
    }
}
