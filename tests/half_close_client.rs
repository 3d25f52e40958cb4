//! Runs inside a lab pod: connects to ADDR, sends BYTES bytes, shuts down its sending side, then
//! prints everything the server sends back until it closes. Proves half-close passes through.
use std::{
    io::{Read, Write},
    net::{Shutdown, TcpStream},
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(addr), Some(bytes)) = (args.next(), args.next()) else {
        return Err("usage: half-close-client ADDR BYTES".into());
    };
    let mut stream = TcpStream::connect(&addr)?;
    stream.write_all(&vec![b'x'; bytes.parse()?])?;
    stream.shutdown(Shutdown::Write)?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    print!("{reply}");
    Ok(())
}
