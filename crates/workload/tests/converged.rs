//! Generated workloads on the simulator converge to the counters the generator predicts:
//! pages_shared = duplicate groups (more where a group exceeds max_page_sharing),
//! pages_sharing = duplicates - pages_shared, ksm_zero_pages = zero pages with use_zero_pages.

use proptest::prelude::*;

use samepage_sim::SimSystem;
use samepage_workload::{GenSpec, GuestSpec, Workload};

fn converge(
    spec: &GenSpec,
    max_page_sharing: u64,
    use_zero_pages: bool,
) -> samepage_engine::KsmCounters {
    run(
        &Workload::generated(spec).unwrap(),
        max_page_sharing,
        use_zero_pages,
    )
}

fn run(w: &Workload, max_page_sharing: u64, use_zero_pages: bool) -> samepage_engine::KsmCounters {
    let mut sys = SimSystem::new();
    sys.write_knob("max_page_sharing", &max_page_sharing.to_string())
        .unwrap();
    sys.write_knob("use_zero_pages", if use_zero_pages { "1" } else { "0" })
        .unwrap();
    sys.write_knob("pages_to_scan", "37").unwrap();
    for s in &w.spaces {
        sys.spawn_with_pages(s.pages(), |i, buf| s.fill_page(i, buf))
            .unwrap();
    }
    sys.write_knob("run", "1").unwrap();
    sys.run_until_stable(2, 100).expect("converges");
    sys.ksm().check_invariants().unwrap();
    sys.counters()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn converged_counters_match_the_generator(
        pages in 1u64..700,
        zero_pct in 0u32..=60,
        dup_pct in 0u32..=40,
        group in 2u32..40,
        seed in any::<u64>(),
        max_page_sharing in prop_oneof![Just(2u64), Just(3), Just(5), Just(16), Just(256)],
        use_zero_pages in any::<bool>(),
    ) {
        let spec = GenSpec { size: pages * 4096, zero_pct, dup_pct, group, seed };
        let want = spec.expected(max_page_sharing, use_zero_pages).unwrap();
        let c = converge(&spec, max_page_sharing, use_zero_pages);
        prop_assert_eq!(
            (c.pages_shared, c.pages_sharing, c.ksm_zero_pages as u64),
            (want.pages_shared, want.pages_sharing, want.ksm_zero_pages)
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 30, ..ProptestConfig::default() })]

    /// The demo's guests: one KSM page per OS-image page, every free page a zero page.
    #[test]
    fn guests_converge_to_one_os_image(
        pages_per_guest in 16u64..400,
        guests in 1u32..6,
        shared_pct in 0u32..=60,
        unique_pct in 0u32..=40,
        seed in any::<u64>(),
    ) {
        let spec = GuestSpec {
            size: pages_per_guest * guests as u64 * 4096,
            guests,
            shared_pct,
            unique_pct,
            seed,
        };
        let want = spec.expected().unwrap();
        let c = run(&Workload::guests(&spec).unwrap(), 256, true);
        prop_assert_eq!(
            (c.pages_shared, c.pages_sharing, c.ksm_zero_pages as u64),
            (want.pages_shared, want.pages_sharing, want.ksm_zero_pages)
        );
    }
}
