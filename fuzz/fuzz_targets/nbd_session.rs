#![no_main]
// An NBD client session: byte 0 bit 0 makes the export writable; the rest
// is every byte the client sends (handshake and requests), written into a
// TCP connection to `Server::serve` while the server's replies are read
// and thrown away. The end of the input ends the session: the server must
// return (a hang is a timeout finding), never panic, stay within the
// memory limit, and the disk keep its size. TCP, not a Unix socket pair:
// std sends on TCP with MSG_NOSIGNAL, so a client write after the server
// dropped the connection is an error here, not a SIGPIPE.
use disk::{MemStorage, RawDisk, VirtualDisk};
use nbd::{Export, Server, Socket};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;

const SIZE: u64 = 1 << 20;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&mode, input)) = data.split_first() else {
        return;
    };
    let disk =
        Arc::new(RawDisk::new(MemStorage::from_vec("fuzz", vec![0u8; SIZE as usize])).unwrap());
    let export = Export {
        name: "d".into(),
        description: "fuzz".into(),
        disk: disk.clone(),
        writable: mode & 1 != 0,
    };
    let server = Server::new(vec![export], |_| {}).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (conn, _) = listener.accept().unwrap();
    let reader = client.try_clone().unwrap();
    std::thread::scope(|s| {
        s.spawn(move || {
            let mut c = client;
            // The server may drop the client before reading it all.
            let _ = c.write_all(input);
            let _ = c.shutdown(Shutdown::Write);
        });
        s.spawn(move || {
            let mut r = reader;
            let mut sink = [0u8; 1 << 16];
            while matches!(r.read(&mut sink), Ok(n) if n > 0) {}
        });
        server.serve(Socket::Tcp(conn));
    });
    assert_eq!(disk.virtual_size(), SIZE);
});
