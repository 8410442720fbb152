//! FHIR R4 export of what a subscriber received for one vehicle: a `collection` Bundle with
//! the vehicle as a Device, each vital sign as a vital-signs Observation (LOINC code, the IEEE
//! 11073 MDC code beside it, UCUM units; blood pressure as the 85354-9 panel), and each
//! waveform stream as one Observation per 10 s window with one component per lead holding
//! SampledData: `data` are the stored integers minus the channel's baseline, `factor` is
//! 1/gain, so origin + factor x data is the physical value exactly as the monitor quantised
//! it; a sample that never arrived is `E`, never interpolated.
//!
//! Fed with the messages of a subscription ([`FhirExport::handle`]); bounded by what one
//! export is asked for (a vehicle and a time range), all of which is held until written.

use std::collections::{BTreeMap, HashMap};

use relay_proto::codes;
use relay_proto::model::{
    StreamDescriptor, SubscribeResponse, VitalSign, frame::Payload, subscribe_response::Record,
};
use serde_json::{Value, json};

/// Samples per channel of one waveform Observation: 10 s at the stream's rate.
pub const WINDOW_SECONDS: f64 = 10.0;

/// LOINC code and display of a vital sign's MDC code (those with a vital-signs profile).
pub(crate) fn loinc(mdc: u32) -> Option<(&'static str, &'static str)> {
    Some(match mdc {
        codes::ECG_HEART_RATE => ("8867-4", "Heart rate"),
        codes::PULS_OXIM_SAT_O2 => ("2708-6", "Oxygen saturation in Arterial blood"),
        codes::RESP_RATE => ("9279-1", "Respiratory rate"),
        codes::TEMP_BODY => ("8310-5", "Body temperature"),
        codes::PRESS_BLD_NONINV_SYS => ("8480-6", "Systolic blood pressure"),
        codes::PRESS_BLD_NONINV_DIA => ("8462-4", "Diastolic blood pressure"),
        codes::PRESS_BLD_NONINV_MEAN => ("8478-0", "Mean blood pressure"),
        codes::AWAY_CO2_ET => (
            "19891-1",
            "Carbon dioxide [Partial pressure] in Exhaled gas --at end expiration",
        ),
        _ => return None,
    })
}

fn mdc_coding(code: u32, display: &str) -> Value {
    json!({ "system": "urn:iso:std:iso:11073:10101", "code": code.to_string(), "display": display })
}

fn loinc_coding(code: &str, display: &str) -> Value {
    json!({ "system": "http://loinc.org", "code": code, "display": display })
}

fn quantity(value: f64, unit: &str) -> Value {
    json!({ "value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit })
}

/// RFC 3339 of UTC nanoseconds (FHIR instant, milliseconds).
fn instant(ns: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// One waveform stream as received.
#[derive(Debug, Default)]
struct Waveform {
    descriptor: StreamDescriptor,
    /// Sample index -> one value per channel.
    samples: BTreeMap<u64, Vec<i32>>,
    /// Capture time of sample 0 (from the first frame seen: capture - index / rate).
    epoch_ns: Option<i64>,
}

/// What one export has gathered.
#[derive(Debug)]
pub struct FhirExport {
    vehicle: String,
    descriptors: HashMap<(u64, u32), StreamDescriptor>,
    waveforms: BTreeMap<(u64, u32), Waveform>,
    /// (capture time, vital signs of one report).
    vitals: Vec<(i64, Vec<VitalSign>)>,
    /// The incident (the EMS case number), when known: the Bundle gets an Encounter.
    incident: Option<String>,
    /// Data captured after this (UTC ns) is left out.
    until_ns: Option<i64>,
}

impl FhirExport {
    /// An export of `vehicle`.
    pub fn new(vehicle: &str) -> Self {
        Self {
            vehicle: vehicle.to_owned(),
            descriptors: HashMap::new(),
            waveforms: BTreeMap::new(),
            vitals: Vec::new(),
            incident: None,
            until_ns: None,
        }
    }

    /// The export belongs to incident `id` (an EMS case number): the Bundle holds an
    /// Encounter for it and every Observation refers to it.
    pub fn with_incident(mut self, id: Option<String>) -> Self {
        self.incident = id.filter(|i| !i.is_empty());
        self
    }

    /// Leaves out data captured after `until_ns` (a time range's end).
    pub fn until(mut self, until_ns: Option<i64>) -> Self {
        self.until_ns = until_ns;
        self
    }

    /// Takes one message of a subscription (others than the vehicle's are ignored).
    pub fn handle(&mut self, msg: &SubscribeResponse) {
        match &msg.record {
            Some(Record::Stream(info)) => {
                if let (Some(s), Some(d)) = (&info.stream, &info.descriptor)
                    && s.vehicle_id == self.vehicle
                {
                    self.descriptors
                        .insert((s.session_id, s.stream_id), d.clone());
                }
            }
            Some(Record::Data(d)) => {
                let (Some(s), Some(f)) = (&d.stream, &d.frame) else {
                    return;
                };
                if s.vehicle_id != self.vehicle
                    || self.until_ns.is_some_and(|t| f.capture_time_ns > t)
                {
                    return;
                }
                match &f.payload {
                    Some(Payload::Vitals(v)) => {
                        self.vitals.push((f.capture_time_ns, v.values.clone()))
                    }
                    Some(Payload::Waveform(w)) => {
                        let Some(desc) = self.descriptors.get(&(s.session_id, s.stream_id)) else {
                            return;
                        };
                        let Some(info) = &desc.waveform else { return };
                        let channels = info.channels.len().max(1);
                        let wf = self
                            .waveforms
                            .entry((s.session_id, s.stream_id))
                            .or_insert_with(|| Waveform {
                                descriptor: desc.clone(),
                                ..Waveform::default()
                            });
                        if wf.epoch_ns.is_none() && info.sample_rate_hz > 0.0 {
                            let offset = w.first_sample_index as f64 / info.sample_rate_hz * 1e9;
                            wf.epoch_ns = Some(f.capture_time_ns - offset.round() as i64);
                        }
                        for (i, chunk) in w.samples.chunks(channels).enumerate() {
                            wf.samples
                                .insert(w.first_sample_index + i as u64, chunk.to_vec());
                        }
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }

    /// The Bundle.
    pub fn bundle(&self) -> Value {
        let device_id = format!("vehicle-{}", self.vehicle);
        let device_ref = json!({ "reference": format!("Device/{device_id}") });
        let mut entries = vec![json!({
            "fullUrl": format!("urn:uuid:device-{}", self.vehicle),
            "resource": {
                "resourceType": "Device",
                "id": device_id,
                "identifier": [{ "system": "urn:ambulance-relay:vehicle", "value": self.vehicle }],
                "deviceName": [{ "name": format!("Ambulance {}", self.vehicle), "type": "user-friendly-name" }],
            }
        })];
        // FHIR ids are 1-64 of [A-Za-z0-9.-]: the case number is kept as is in the identifier.
        let encounter = self.incident.as_ref().map(|incident| {
            let safe: String = incident
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '.' {
                        c
                    } else {
                        '-'
                    }
                })
                .take(55)
                .collect();
            let id = format!("incident-{safe}");
            entries.push(json!({
                "fullUrl": format!("urn:uuid:{}-{id}", self.vehicle),
                "resource": {
                    "resourceType": "Encounter",
                    "id": id,
                    "status": "in-progress",
                    "class": {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                        "code": "EMER",
                        "display": "emergency",
                    },
                    "identifier": [{ "system": "urn:ambulance-relay:incident", "value": incident }],
                    "serviceProvider": { "display": format!("Ambulance {}", self.vehicle) },
                }
            }));
            json!({ "reference": format!("Encounter/{id}") })
        });
        let mut n = 0usize;
        let mut push = |entries: &mut Vec<Value>, mut resource: Value| {
            n += 1;
            let id = format!("obs-{n}");
            resource["id"] = json!(id);
            if let Some(e) = &encounter {
                resource["encounter"] = e.clone();
            }
            entries.push(json!({ "fullUrl": format!("urn:uuid:{}-{id}", self.vehicle), "resource": resource }));
        };
        let category = json!([{ "coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
            "code": "vital-signs", "display": "Vital Signs" }] }]);
        for (at, report) in &self.vitals {
            let mut bp: Vec<Value> = Vec::new();
            for v in report {
                let mut coding = vec![mdc_coding(v.mdc_code, &v.label)];
                let loinc = loinc(v.mdc_code);
                if let Some((code, display)) = loinc {
                    coding.insert(0, loinc_coding(code, display));
                }
                if v.mdc_code == codes::PULS_OXIM_SAT_O2 {
                    coding.insert(
                        1,
                        loinc_coding(
                            "59408-5",
                            "Oxygen saturation in Arterial blood by Pulse oximetry",
                        ),
                    );
                }
                if matches!(
                    v.mdc_code,
                    codes::PRESS_BLD_NONINV_SYS
                        | codes::PRESS_BLD_NONINV_DIA
                        | codes::PRESS_BLD_NONINV_MEAN
                ) {
                    bp.push(json!({ "code": { "coding": coding }, "valueQuantity": quantity(v.value, &v.unit) }));
                    continue;
                }
                push(
                    &mut entries,
                    json!({
                        "resourceType": "Observation",
                        "status": "final",
                        "category": category,
                        "code": { "coding": coding, "text": v.label },
                        "effectiveDateTime": instant(*at),
                        "device": device_ref,
                        "valueQuantity": quantity(v.value, &v.unit),
                    }),
                );
            }
            if !bp.is_empty() {
                push(
                    &mut entries,
                    json!({
                        "resourceType": "Observation",
                        "status": "final",
                        "category": category,
                        "code": { "coding": [loinc_coding("85354-9", "Blood pressure panel with all children optional")], "text": "NIBP" },
                        "effectiveDateTime": instant(*at),
                        "device": device_ref,
                        "component": bp,
                    }),
                );
            }
        }
        for ((session, stream_id), wf) in &self.waveforms {
            let Some(info) = &wf.descriptor.waveform else {
                continue;
            };
            let (Some(&first), Some(&last)) =
                (wf.samples.keys().next(), wf.samples.keys().next_back())
            else {
                continue;
            };
            let rate = info.sample_rate_hz;
            let window = ((rate * WINDOW_SECONDS).round() as u64).max(1);
            let period_ms = 1000.0 / rate;
            let epoch = wf.epoch_ns.unwrap_or(0);
            let time_of = |index: u64| epoch + (index as f64 / rate * 1e9).round() as i64;
            let mut start = first - first % window;
            while start <= last {
                let end = start + window; // exclusive
                let from = start.max(first);
                let to = end.min(last + 1);
                let components: Vec<Value> = info
                    .channels
                    .iter()
                    .enumerate()
                    .map(|(c, ch)| {
                        let data: Vec<String> = (from..to)
                            .map(|i| match wf.samples.get(&i).and_then(|s| s.get(c)) {
                                Some(v) => (i64::from(*v) - i64::from(ch.baseline)).to_string(),
                                None => "E".to_owned(),
                            })
                            .collect();
                        let gain = if ch.gain > 0.0 { ch.gain } else { 1.0 };
                        let code = if ch.mdc_code != 0 {
                            ch.mdc_code
                        } else {
                            codes::ecg_lead(&ch.name)
                        };
                        json!({
                            "code": { "coding": [mdc_coding(code, &ch.name)], "text": ch.name },
                            "valueSampledData": {
                                "origin": quantity(0.0, &ch.unit),
                                "period": period_ms,
                                "factor": 1.0 / gain,
                                "dimensions": 1,
                                "data": data.join(" "),
                            }
                        })
                    })
                    .collect();
                push(
                    &mut entries,
                    json!({
                        "resourceType": "Observation",
                        "status": "final",
                        "category": [{ "coding": [{
                            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                            "code": "procedure", "display": "Procedure" }] }],
                        "code": { "coding": [mdc_coding(codes::ECG_ELEC_POTL, &wf.descriptor.name)], "text": wf.descriptor.name },
                        "identifier": [{ "system": "urn:ambulance-relay:stream", "value": format!("{}/{session}/{stream_id}/{from}", self.vehicle) }],
                        "effectivePeriod": { "start": instant(time_of(from)), "end": instant(time_of(to)) },
                        "device": device_ref,
                        "component": components,
                    }),
                );
                start = end;
            }
        }
        json!({
            "resourceType": "Bundle",
            "type": "collection",
            "timestamp": instant(relay_ops::now_utc_ns()),
            "entry": entries,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_proto::model::{
        ChannelInfo, DataRecord, Frame, StreamInfo, StreamKind, StreamRef, VitalsReport,
        WaveformChunk, WaveformInfo,
    };

    fn stream(id: u32, kind: StreamKind) -> StreamRef {
        StreamRef {
            vehicle_id: "amb-1".into(),
            session_id: 1,
            stream_id: id,
            kind: kind as i32,
        }
    }

    fn data(s: StreamRef, capture: i64, payload: Payload) -> SubscribeResponse {
        SubscribeResponse {
            provisional: false,
            cursor: 0,
            record: Some(Record::Data(DataRecord {
                stream: Some(s),
                frame: Some(Frame {
                    capture_time_ns: capture,
                    payload: Some(payload),
                    ..Frame::default()
                }),
                ..DataRecord::default()
            })),
        }
    }

    #[test]
    fn missing_samples_are_e_and_vitals_carry_loinc_and_mdc() {
        let mut x = FhirExport::new("amb-1");
        let ecg = stream(0, StreamKind::Waveform);
        x.handle(&SubscribeResponse {
            provisional: false,
            cursor: 0,
            record: Some(Record::Stream(StreamInfo {
                stream: Some(ecg.clone()),
                descriptor: Some(StreamDescriptor {
                    name: "ecg".into(),
                    waveform: Some(WaveformInfo {
                        sample_rate_hz: 2.0,
                        channels: vec![ChannelInfo {
                            name: "II".into(),
                            unit: "mV".into(),
                            gain: 200.0,
                            baseline: 10,
                            ..ChannelInfo::default()
                        }],
                        source: String::new(),
                        ..WaveformInfo::default()
                    }),
                    ..StreamDescriptor::default()
                }),
            })),
        });
        // Samples 0..4 and 6..8 at 2 Hz; 4 and 5 never arrived; another vehicle ignored.
        let chunk = |first: u64, samples: Vec<i32>| {
            Payload::Waveform(WaveformChunk {
                first_sample_index: first,
                sample_count: samples.len() as u32,
                samples,
                ..Default::default()
            })
        };
        x.handle(&data(
            ecg.clone(),
            1_000_000_000,
            chunk(0, vec![10, 210, 410, 10]),
        ));
        x.handle(&data(ecg.clone(), 4_000_000_000, chunk(6, vec![-190, 10])));
        let other = StreamRef {
            vehicle_id: "amb-2".into(),
            ..ecg.clone()
        };
        x.handle(&data(other, 0, chunk(4, vec![1, 2])));
        let hr = VitalSign {
            mdc_code: codes::ECG_HEART_RATE,
            label: "HR".into(),
            value: 72.0,
            unit: "/min".into(),
        };
        x.handle(&data(
            stream(1, StreamKind::Vitals),
            2_000_000_000,
            Payload::Vitals(VitalsReport { values: vec![hr] }),
        ));
        let b = x.bundle();
        let entries = b["entry"].as_array().unwrap();
        assert_eq!(entries[0]["resource"]["resourceType"], "Device");
        let wave = entries
            .iter()
            .map(|e| &e["resource"])
            .find(|r| r["component"][0]["valueSampledData"].is_object())
            .unwrap();
        let sd = &wave["component"][0]["valueSampledData"];
        assert_eq!(sd["data"], "0 200 400 0 E E -200 0");
        assert_eq!(sd["factor"], 1.0 / 200.0);
        assert_eq!(sd["period"], 500.0);
        assert_eq!(sd["origin"]["code"], "mV");
        assert_eq!(wave["effectivePeriod"]["start"], "1970-01-01T00:00:01.000Z");
        let vitals = entries
            .iter()
            .map(|e| &e["resource"])
            .find(|r| r["valueQuantity"].is_object())
            .unwrap();
        let codes: Vec<&str> = vitals["code"]["coding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["code"].as_str().unwrap())
            .collect();
        assert_eq!(codes, ["8867-4", "147842"]);
        assert_eq!(vitals["valueQuantity"]["code"], "/min");
    }
}
