#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vhd::parent_locator::ParentLocator::parse(data);
});
