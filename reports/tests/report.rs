//! Report generation writes files that parse: well-formed SVG, decodable PNG, tables with
//! the numbers.

use deja_bench::record::RecordReplayMeasurement;
use deja_bench::results::{FORMAT_VERSION, Machine, PerfValue};
use deja_bench::{BenchResults, Measurement, Status, Summary};
use std::collections::BTreeMap;

fn measurement(
    bench: &str,
    engine: &str,
    mmu: &str,
    ns: f64,
    exits: &[(&str, f64)],
) -> Measurement {
    Measurement {
        bench: bench.into(),
        engine: engine.into(),
        mmu: mmu.into(),
        status: Status::Ok,
        iterations: 1000,
        repeats: 3,
        ns_per_op: Summary::of(&[ns, ns * 0.9, ns * 1.2]),
        exits_per_op: exits.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        counters_per_op: BTreeMap::from([
            ("mmu.tlb_hit".to_string(), 1.5),
            ("mmu.walks".to_string(), 0.5),
            ("mmu.mmu_pte_write".to_string(), 1.0),
        ]),
        perf: vec![PerfValue {
            event: "cycles".into(),
            per_op: None,
            unavailable: Some("No such file or directory (os error 2)".into()),
        }],
    }
}

fn results() -> BenchResults {
    BenchResults {
        format_version: FORMAT_VERSION,
        deja_version: "0.1.0".into(),
        git_revision: Some("0123abcd".into()),
        started_unix: 1_795_000_000,
        machine: Machine {
            kernel: "Linux test".into(),
            cpus: 2,
            host: deja_kvm::host_info::HostInfo::detect(),
            memory_bytes: Some(8 << 30),
            load_average: Some([3.5, 2.0, 1.0]),
            build_profile: Some("release".into()),
            qemu_version: None,
        },
        measurements: vec![
            measurement("in", "bt", "tlb", 950.0, &[]),
            measurement("ptemod", "bt", "shadow", 1200.0, &[]),
            measurement("in", "kvm", "host", 12000.0, &[("exit.io_in", 1.0)]),
            measurement(
                "cpuid",
                "kvm",
                "host",
                2400.0,
                &[("exit.cpuid", 1.0), ("exit.io_in", 0.5)],
            ),
            measurement("call-ret", "native", "host", 1.4, &[]),
            Measurement::skipped(
                "in",
                "qemu-tcg",
                "host",
                "qemu-system-x86_64 is not on PATH",
            ),
        ],
        record_replay: vec![RecordReplayMeasurement {
            guest: "racy-kernel".into(),
            engine: "bt".into(),
            clock: "virtual".into(),
            status: Status::Ok,
            repeats: 3,
            icount: 39_500_000,
            exits: 1200,
            events: 5000,
            checkpoints: 4,
            trace_bytes: 123_456,
            guest_ns: 250_000_000,
            plain_seconds: Summary::of(&[1.0]),
            record_seconds: Summary::of(&[1.08]),
            replay_seconds: Summary::of(&[1.05]),
            ns_per_instruction: Some([25.25, 27.5, 26.75]),
            record_overhead: Some(0.08),
            replay_speed: Some(1.03),
            trace_bytes_per_guest_second: Some(473_000.0),
            trace_bytes_per_event: Some(2.46),
            events_per_guest_second: Some(20_000.0),
            checkpoint_seconds: None,
            seek_seconds: None,
            qemu_tcg_seconds: None,
        }],
    }
}

#[test]
fn the_report_writes_well_formed_svg_decodable_png_and_tables() {
    let dir = std::env::temp_dir().join(format!("deja-report-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let written = deja_reports::write_report(&[results()], &dir).unwrap();
    let names: Vec<String> = written
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for plot in ["ns_per_op", "exits_per_op", "mmu_counters", "recording"] {
        assert!(names.contains(&format!("{plot}.svg")), "{names:?}");
        let svg = std::fs::read_to_string(dir.join(format!("{plot}.svg"))).unwrap();
        let doc = roxmltree::Document::parse(&svg).unwrap_or_else(|e| panic!("{plot}.svg: {e}"));
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        // Bars are drawn as rectangles (the background is one more).
        assert!(
            doc.descendants().filter(|n| n.has_tag_name("rect")).count() > 2,
            "{plot}"
        );
        let png = std::fs::File::open(dir.join(format!("{plot}.png"))).unwrap();
        let mut reader = png::Decoder::new(std::io::BufReader::new(png))
            .read_info()
            .unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!(info.width, 1400, "{plot}.png");
        // Text is drawn with the embedded font: the SVG carries the titles.
        assert!(
            doc.descendants().any(|n| n.has_tag_name("text")
                && n.text().is_some_and(
                    |t| t.contains("per operation") || t.contains("per guest instruction")
                )),
            "{plot}.svg has no title text"
        );
        // Not a blank canvas.
        assert!(buf.iter().any(|&b| b != 0xff), "{plot}.png is all white");
    }
    let summary = std::fs::read_to_string(dir.join("summary.md")).unwrap();
    assert!(
        summary.contains("| in |  | 950.0 [855.0, 1140.0] |"),
        "{summary}"
    );
    assert!(
        summary.contains("qemu-system-x86_64 is not on PATH"),
        "{summary}"
    );
    assert!(summary.contains("cycles: unavailable"), "{summary}");
    assert!(summary.contains("a loaded machine"), "{summary}");
    assert!(
        summary.contains(
            "| racy-kernel | bt | virtual | 39500000 | 1200 | 5000 | 123456 | 25.25 | 27.50 | \
             26.75 | +8.0% | 1.03x | 473000 | 2.46 |"
        ),
        "{summary}"
    );
    assert!(summary.contains("mmu_pte_write"), "{summary}");
    let html = std::fs::read_to_string(dir.join("index.html")).unwrap();
    for plot in ["ns_per_op", "exits_per_op", "mmu_counters", "recording"] {
        assert!(html.contains(&format!("<img src=\"{plot}.png\"")), "{html}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_empty_report_is_an_error() {
    let dir = std::env::temp_dir().join("deja-report-empty");
    assert!(deja_reports::write_report(&[], &dir).is_err());
}
