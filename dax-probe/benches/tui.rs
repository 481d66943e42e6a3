//! `cargo xtask bench tui`: what one dashboard frame costs (model snapshot + render) at the
//! smallest supported terminal and a large one, against its 200 ms redraw period. Printed,
//! never asserted.

use std::{hint::black_box, time::Instant};

use dax_probe::{
    policy::Policy,
    ui::tui::{
        app::{App, Source},
        model::Model,
        replay,
        view::frame,
    },
};

const FIXTURE: &str = include_str!("../tests/fixtures/monitor-6.12.jsonl");

fn main() {
    let mut model = Model::new();
    replay::load_str(&mut model, FIXTURE);
    let mut app = App::new(
        Source::Replay {
            file: "monitor-6.12.jsonl".into(),
            speed: 1.0,
            done: true,
        },
        Policy::default(),
    );
    println!("dashboard frame (snapshot + render of a recorded 6.12 session):");
    for (w, h) in [(80u16, 24u16), (120, 40), (200, 60)] {
        let n = 500;
        let t = Instant::now();
        for _ in 0..n {
            app.update(model.snapshot());
            black_box(frame(&app, w, h));
        }
        let per = t.elapsed() / n;
        println!(
            "  {w:>3}x{h:<3} {per:>10.2?} per frame = {:.2}% of the 200 ms redraw period",
            per.as_secs_f64() / 0.2 * 100.0
        );
    }
}
