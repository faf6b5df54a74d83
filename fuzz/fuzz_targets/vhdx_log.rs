#![no_main]
// The input is a whole log region; the GUID is the first 16 bytes.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.len() < 16 {
        return;
    }
    let guid = vhdx::guid::read_guid(data, 0);
    let log = &data[16..];
    let usable = log.len() / 4096 * 4096;
    let _ = vhdx::log::find_active_sequence(&log[..usable], guid);
});
