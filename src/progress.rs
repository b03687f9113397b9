//! Per-layer progress: bars (bytes and rate) on a terminal, plain lines otherwise.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use oci_spec::image::Descriptor;
use rootfs::applier::ProgressFn;

/// Tracks the layers of one unpack.
pub struct Progress {
    bars: Option<MultiProgress>,
    layers: Mutex<HashMap<String, (Option<ProgressBar>, Instant)>>,
}

fn short(d: &str) -> &str {
    let hex = d.split_once(':').map_or(d, |(_, h)| h);
    &hex[..hex.len().min(12)]
}

impl Progress {
    /// Bars when stderr is a terminal.
    pub fn new() -> Arc<Progress> {
        let bars = std::io::stderr()
            .is_terminal()
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Arc::new(Progress {
            bars,
            layers: Mutex::new(HashMap::new()),
        })
    }

    /// The callback to hand to the applier.
    pub fn callback(self: &Arc<Self>) -> Arc<ProgressFn> {
        let me = self.clone();
        Arc::new(move |desc: &Descriptor, read: u64| me.update(desc, read))
    }

    fn update(&self, desc: &Descriptor, read: u64) {
        let key = desc.digest().to_string();
        let total = desc.size();
        let mut layers = self.layers.lock().unwrap_or_else(|p| p.into_inner());
        let (bar, started) = layers.entry(key.clone()).or_insert_with(|| {
            let bar = self.bars.as_ref().map(|m| {
                let b = m.add(ProgressBar::new(total));
                b.set_style(
                    ProgressStyle::with_template(
                        "{prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                b.set_prefix(format!("layer {}", short(&key)));
                b
            });
            (bar, Instant::now())
        });
        if let Some(b) = bar {
            b.set_position(read);
            if read >= total {
                b.finish();
            }
        } else if read >= total {
            let secs = started.elapsed().as_secs_f64().max(1e-6);
            eprintln!(
                "layer {}: {} bytes in {:.2}s ({:.1} MB/s)",
                short(&key),
                read,
                secs,
                read as f64 / secs / 1e6
            );
        }
    }
}
