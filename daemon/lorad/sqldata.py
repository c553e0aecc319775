"""The bundled text-to-SQL set (`builtin:text-to-sql`): gretel-shaped rows, generated and executed.

Each row has the 11 columns of gretelai/synthetic_text_to_sql. Schemas come
from 24 domains (an entity table, an event table and a regions table); tasks
cover every complexity class (basic SQL, aggregation, single join, multiple
joins, subqueries, window functions, CTEs, set operations) plus INSERT,
UPDATE and DELETE, each with several phrasings. Every gold query is executed
in SQLite against its own context at generation: a SELECT is kept only if it
runs and returns rows, a DML statement only if it changes rows.

    python -m lorad.sqldata --rows 6000 --seed 0 --out daemon/lorad/resources/text_to_sql.jsonl.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorad import resources

DATA_FILE = resources.path(resources.TEXT_TO_SQL)


@dataclass(frozen=True)
class Domain:
    name: str
    description: str
    table: str  # entity table
    one: str  # entity noun, singular
    many: str  # entity noun, plural
    names: tuple[str, ...]
    cat: str  # category column
    cat_noun: str
    cats: tuple[str, ...]
    n1: str  # integer attribute
    n1_noun: str
    n1_range: tuple[int, int]
    n2: str  # real attribute
    n2_noun: str
    n2_range: tuple[float, float]
    facts: str  # event table
    fact: str
    fact_many: str
    amount: str
    amount_noun: str
    amount_range: tuple[int, int]
    qty: str
    qty_noun: str
    qty_range: tuple[int, int]
    date: str
    status: str
    status_noun: str
    statuses: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.one.replace(' ', '_')}_id"

    @property
    def fact_id(self) -> str:
        return f"{self.fact.replace(' ', '_')}_id"


D = Domain
DOMAINS = [
    D("healthcare", "Hospital capacity, admissions and treatment costs.", "hospitals", "hospital", "hospitals",
      ("St. Mary", "General City", "Riverside", "Mercy", "Lakeside", "Hilltop", "Unity"), "type", "type",
      ("public", "private", "teaching"), "beds", "number of beds", (40, 900), "rating", "rating", (1, 5),
      "admissions", "admission", "admissions", "cost", "cost", (200, 9000), "stay_days", "length of stay", (1, 30),
      "admit_date", "department", "department", ("cardiology", "oncology", "emergency", "pediatrics")),
    D("retail", "Stores, their sales and product categories.", "stores", "store", "stores",
      ("Downtown", "Mall Plaza", "Harbor", "Northgate", "Airport", "Old Town"), "format", "format",
      ("supermarket", "convenience", "outlet"), "employees", "number of employees", (5, 250), "floor_area", "floor area", (100, 5000),
      "sales", "sale", "sales", "revenue", "revenue", (50, 5000), "units", "units sold", (1, 120),
      "sale_date", "channel", "channel", ("online", "in-store", "phone")),
    D("education", "Schools, enrollment and exam results.", "schools", "school", "schools",
      ("Lincoln High", "Oak Ridge", "Maple Academy", "Westview", "Central Prep", "Pine Valley"), "level", "level",
      ("primary", "secondary", "vocational"), "students", "number of students", (80, 2500), "avg_score", "average score", (50, 100),
      "enrollments", "enrollment", "enrollments", "tuition", "tuition", (500, 12000), "credits", "credits", (1, 30),
      "enroll_date", "program", "program", ("science", "arts", "sports", "languages")),
    D("energy", "Power plants, capacity and electricity generation.", "power_plants", "plant", "plants",
      ("Sunridge", "Windhaven", "Blue River", "Coal Creek", "Tidewater", "Geo North"), "source", "energy source",
      ("solar", "wind", "hydro", "coal"), "capacity_mw", "capacity in MW", (10, 1500), "efficiency", "efficiency", (20, 60),
      "generation", "generation record", "generation records", "output_mwh", "output in MWh", (100, 20000), "hours", "operating hours", (1, 24),
      "record_date", "grid", "grid", ("north", "south", "islanded")),
    D("finance", "Bank branches, loans and customer accounts.", "branches", "branch", "branches",
      ("Main Street", "Riverside", "Uptown", "Eastside", "Harbor Point", "Midtown"), "tier", "tier",
      ("retail", "commercial", "private"), "staff", "number of staff", (3, 80), "satisfaction", "customer satisfaction", (1, 10),
      "loans", "loan", "loans", "principal", "principal", (1000, 90000), "term_months", "term in months", (6, 360),
      "issue_date", "status", "status", ("approved", "pending", "defaulted", "repaid")),
    D("agriculture", "Farms, crops and harvest yields.", "farms", "farm", "farms",
      ("Green Acres", "Sunny Fields", "Willow Creek", "Red Barn", "Golden Plains", "Misty Hollow"), "farming_type", "farming type",
      ("organic", "conventional", "hydroponic"), "acres", "area in acres", (10, 3000), "soil_ph", "soil pH", (5, 8),
      "harvests", "harvest", "harvests", "yield_kg", "yield in kg", (100, 50000), "workers", "number of workers", (1, 40),
      "harvest_date", "crop", "crop", ("wheat", "corn", "soy", "rice")),
    D("transportation", "Transit routes, trips and ridership.", "routes", "route", "routes",
      ("Red Line", "Blue Line", "Express 5", "Airport Shuttle", "Crosstown", "Harbor Loop"), "mode", "mode",
      ("bus", "rail", "ferry"), "stops", "number of stops", (4, 60), "length_km", "length in km", (2, 80),
      "trips", "trip", "trips", "fare_revenue", "fare revenue", (20, 3000), "passengers", "passengers", (1, 400),
      "trip_date", "service", "service type", ("regular", "express", "night")),
    D("real estate", "Properties, listings and sale prices.", "properties", "property", "properties",
      ("Elm Court", "Bay View", "Cedar House", "Park Lofts", "Sunset Villa", "Kings Row"), "property_type", "property type",
      ("apartment", "house", "condo"), "bedrooms", "number of bedrooms", (1, 6), "size_sqm", "size in square meters", (30, 400),
      "listings", "listing", "listings", "price", "price", (50000, 900000), "days_listed", "days on market", (1, 200),
      "list_date", "listing_status", "listing status", ("active", "sold", "withdrawn")),
    D("sports", "Teams, matches and player statistics.", "teams", "team", "teams",
      ("Falcons", "Tigers", "Rovers", "Sharks", "Wolves", "Titans"), "league", "league",
      ("premier", "championship", "amateur"), "founded", "founding year", (1880, 2015), "win_rate", "win rate", (10, 90),
      "matches", "match", "matches", "attendance", "attendance", (500, 60000), "goals", "goals scored", (0, 7),
      "match_date", "venue_type", "venue type", ("home", "away", "neutral")),
    D("hospitality", "Hotels, bookings and occupancy.", "hotels", "hotel", "hotels",
      ("Grand Plaza", "Seaside Inn", "Mountain Lodge", "City Suites", "Royal Palm", "Garden Hotel"), "category", "category",
      ("luxury", "budget", "boutique"), "rooms", "number of rooms", (10, 600), "review_score", "review score", (1, 10),
      "bookings", "booking", "bookings", "amount", "booking amount", (60, 4000), "nights", "nights", (1, 14),
      "booking_date", "booking_channel", "booking channel", ("direct", "agency", "app")),
    D("manufacturing", "Factories, production runs and defects.", "factories", "factory", "factories",
      ("Plant Alpha", "Delta Works", "Ironside", "Northmill", "Precision One", "Bayforge"), "industry", "industry",
      ("automotive", "electronics", "textiles"), "workers", "number of workers", (20, 3000), "automation_level", "automation level", (0, 100),
      "production_runs", "production run", "production runs", "units_produced", "units produced", (100, 20000), "defects", "defects", (0, 90),
      "run_date", "shift", "shift", ("day", "night", "weekend")),
    D("telecommunications", "Cell towers, subscribers and data usage.", "towers", "tower", "towers",
      ("T-North", "T-Central", "T-Harbor", "T-Valley", "T-Ridge", "T-Airport"), "technology", "technology",
      ("4G", "5G", "3G"), "subscribers", "number of subscribers", (100, 20000), "uptime", "uptime percentage", (90, 100),
      "usage_logs", "usage log", "usage logs", "data_gb", "data used in GB", (1, 900), "calls", "calls", (0, 500),
      "log_date", "plan", "plan", ("prepaid", "postpaid", "business")),
    D("environment", "Monitoring stations and air quality readings.", "stations", "station", "stations",
      ("Airport East", "City Park", "Harbor South", "Industrial Zone", "Hill Top", "River Bank"), "zone", "zone",
      ("urban", "rural", "industrial"), "elevation", "elevation in meters", (0, 1800), "tree_cover", "tree cover percentage", (0, 80),
      "readings", "reading", "readings", "pm25", "PM2.5 level", (2, 180), "aqi", "air quality index", (10, 300),
      "reading_date", "pollutant", "main pollutant", ("ozone", "no2", "so2", "dust")),
    D("media", "Streaming shows, views and subscriptions.", "shows", "show", "shows",
      ("Night Shift", "Deep Blue", "The Kitchen", "Lost City", "Fast Lane", "Quiet Hours"), "genre", "genre",
      ("drama", "comedy", "documentary"), "episodes", "number of episodes", (4, 120), "imdb_rating", "rating", (3, 10),
      "views", "view", "views", "watch_minutes", "minutes watched", (1, 600), "viewers", "viewers", (1, 5000),
      "view_date", "device", "device", ("tv", "mobile", "web")),
    D("logistics", "Warehouses, shipments and delivery times.", "warehouses", "warehouse", "warehouses",
      ("Hub North", "Port Depot", "Central DC", "East Yard", "Air Cargo", "South Terminal"), "warehouse_type", "warehouse type",
      ("cold storage", "general", "hazmat"), "docks", "number of docks", (2, 60), "utilization", "utilization percentage", (10, 100),
      "shipments", "shipment", "shipments", "weight_kg", "weight in kg", (5, 20000), "delivery_days", "delivery time in days", (1, 20),
      "ship_date", "carrier", "carrier", ("road", "rail", "air", "sea")),
    D("government", "Public agencies, budgets and programs.", "agencies", "agency", "agencies",
      ("Health Dept", "Transport Office", "Parks Board", "Housing Authority", "Water Board", "Tax Office"), "level", "government level",
      ("federal", "state", "municipal"), "employees", "number of employees", (10, 9000), "approval", "approval rating", (10, 90),
      "programs", "program", "programs", "budget", "budget", (10000, 900000), "beneficiaries", "beneficiaries", (10, 5000),
      "start_date", "program_area", "program area", ("housing", "health", "education", "infrastructure")),
    D("cybersecurity", "Systems, security incidents and response times.", "systems", "system", "systems",
      ("Payroll", "CRM", "Mail Gateway", "VPN", "Web Portal", "Data Lake"), "criticality", "criticality",
      ("high", "medium", "low"), "users", "number of users", (5, 8000), "patch_level", "patch level", (50, 100),
      "incidents", "incident", "incidents", "loss", "financial loss", (0, 90000), "response_hours", "response time in hours", (1, 96),
      "incident_date", "severity", "severity", ("critical", "major", "minor")),
    D("aviation", "Airlines, flights and delays.", "airlines", "airline", "airlines",
      ("SkyJet", "AeroNova", "BlueWing", "Polar Air", "SunExpress", "Coastal"), "carrier_type", "carrier type",
      ("low-cost", "full-service", "regional"), "fleet_size", "fleet size", (5, 700), "on_time_rate", "on-time rate", (50, 99),
      "flights", "flight", "flights", "ticket_revenue", "ticket revenue", (2000, 300000), "delay_minutes", "delay in minutes", (0, 240),
      "flight_date", "cabin", "cabin", ("economy", "business", "first")),
    D("nonprofit", "Charities, donations and volunteers.", "charities", "charity", "charities",
      ("Hope Fund", "Clean Water Now", "Kids First", "Green Earth", "Food Bridge", "Open Books"), "cause", "cause",
      ("health", "environment", "education"), "volunteers", "number of volunteers", (5, 2000), "overhead", "overhead percentage", (3, 40),
      "donations", "donation", "donations", "donation_amount", "donation amount", (5, 20000), "donors", "donors", (1, 300),
      "donation_date", "method", "payment method", ("card", "transfer", "cash")),
    D("gaming", "Games, players and in-game purchases.", "games", "game", "games",
      ("Star Quest", "Block Party", "Night Racer", "Dragon Tale", "Pixel Farm", "Void Ops"), "platform", "platform",
      ("pc", "console", "mobile"), "release_year", "release year", (2005, 2024), "metascore", "review score", (40, 98),
      "purchases", "purchase", "purchases", "price_paid", "price paid", (1, 120), "items", "items bought", (1, 20),
      "purchase_date", "region_code", "store region", ("na", "eu", "apac")),
    D("insurance", "Policies, claims and payouts.", "policies", "policy", "policies",
      ("Home Shield", "Auto Plus", "Life Basic", "Travel Safe", "Health Gold", "Farm Guard"), "line", "line of business",
      ("auto", "home", "life"), "term_years", "term in years", (1, 30), "premium", "annual premium", (200, 5000),
      "claims", "claim", "claims", "payout", "payout", (100, 80000), "days_to_settle", "days to settle", (1, 180),
      "claim_date", "claim_status", "claim status", ("open", "closed", "denied")),
    D("food service", "Restaurants, orders and menu revenue.", "restaurants", "restaurant", "restaurants",
      ("Bella Roma", "Spice Route", "Green Bowl", "Burger Barn", "Sushi Go", "Taco Town"), "cuisine", "cuisine",
      ("italian", "asian", "mexican"), "seats", "number of seats", (10, 300), "hygiene_score", "hygiene score", (60, 100),
      "orders", "order", "orders", "order_total", "order total", (5, 400), "items", "items ordered", (1, 15),
      "order_date", "order_type", "order type", ("dine-in", "takeaway", "delivery")),
    D("mining", "Mines, extraction and safety.", "mines", "mine", "mines",
      ("Copper Ridge", "Iron Hill", "Gold Gulch", "Silver Lake", "Coal Valley", "Deep Rock"), "mineral", "mineral",
      ("copper", "iron", "gold"), "depth_m", "depth in meters", (50, 3000), "recovery_rate", "recovery rate", (40, 98),
      "extractions", "extraction", "extractions", "tonnes", "tonnes extracted", (10, 90000), "accidents", "accidents", (0, 6),
      "extraction_date", "shift_type", "shift type", ("day", "night", "rotating")),
    D("pharmaceuticals", "Drugs, clinical trials and approvals.", "drugs", "drug", "drugs",
      ("Cardiolex", "Neurovia", "Immunex", "Dermacort", "Oncoprime", "Respira"), "therapy_area", "therapy area",
      ("cardiology", "oncology", "neurology"), "patents", "number of patents", (1, 40), "efficacy", "efficacy rate", (20, 95),
      "trials", "trial", "trials", "trial_cost", "trial cost", (50000, 900000), "participants", "participants", (10, 3000),
      "trial_date", "phase", "phase", ("phase 1", "phase 2", "phase 3")),
]

REGIONS = [("North", "Canada"), ("South", "Mexico"), ("East", "USA"), ("West", "USA"), ("Central", "Canada")]

COMPLEXITY_DESCRIPTIONS = {
    "basic SQL": "basic SQL with a simple select statement",
    "aggregation": "aggregation functions (COUNT, SUM, AVG, MIN, MAX, etc.), and HAVING clause",
    "single join": "only one join (specify inner, outer, cross)",
    "multiple_joins": "two or more joins (specify inner, outer, cross)",
    "subqueries": "subqueries, including correlated and nested subqueries",
    "window functions": "window functions (e.g., ROW, LAG, LEAD, RANK, NTILE, PERCENT_RANK, etc.) with partitioning and ordering",
    "CTEs": "common table expressions",
    "set operations": "set operations such as UNION, INTERSECT, and EXCEPT",
}
TASK_DESCRIPTIONS = {
    "analytics and reporting": "generating reports, dashboards, and analytical insights",
    "data manipulation": "inserting, updating, or deleting records",
}


def _q(value: Any) -> str:
    return "'" + str(value).replace("'", "''") + "'" if isinstance(value, str) else str(value)


class World:
    """One random instance of a domain: its rows, and the CREATE/INSERT text for each table."""

    def __init__(self, d: Domain, rng: random.Random):
        self.d = d
        n_entities = rng.randint(4, 6)
        names = rng.sample(d.names, n_entities)
        regions = rng.sample(REGIONS, 3)
        self.regions = regions
        self.entities = []
        for i, name in enumerate(names, 1):
            self.entities.append({
                d.id: i, "name": name, d.cat: rng.choice(d.cats), "region": rng.choice(regions)[0],
                d.n1: rng.randint(*d.n1_range), d.n2: round(rng.uniform(*d.n2_range), 1),
            })
        self.facts = []
        for j in range(1, rng.randint(6, 9) + 1):
            year = rng.choice([2021, 2022, 2023])
            self.facts.append({
                d.fact_id: j, d.id: rng.randint(1, n_entities), d.amount: rng.randint(*d.amount_range),
                d.qty: rng.randint(*d.qty_range), d.date: f"{year}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
                d.status: rng.choice(d.statuses),
            })

    def create(self, table: str) -> str:
        d = self.d
        if table == "entity":
            cols = f"{d.id} INT, name VARCHAR(50), {d.cat} VARCHAR(30), region VARCHAR(20), {d.n1} INT, {d.n2} REAL"
            rows, name = self.entities, d.table
        elif table == "facts":
            cols = f"{d.fact_id} INT, {d.id} INT, {d.amount} INT, {d.qty} INT, {d.date} DATE, {d.status} VARCHAR(30)"
            rows, name = self.facts, d.facts
        else:
            cols = "region VARCHAR(20), country VARCHAR(30)"
            rows, name = [{"region": r, "country": c} for r, c in self.regions], "regions"
        keys = list(rows[0])
        values = ", ".join("(" + ", ".join(_q(r[k]) for k in keys) + ")" for r in rows)
        return f"CREATE TABLE {name} ({cols}); INSERT INTO {name} ({', '.join(keys)}) VALUES {values};"

    def context(self, tables: tuple[str, ...]) -> str:
        return " ".join(self.create(t) for t in tables)


@dataclass
class Task:
    complexity: str
    task_type: str
    tables: tuple[str, ...]
    build: Callable[[Domain, World, random.Random], tuple[list[str], str, str]]  # → (phrasings, sql, explanation)


def _pick(rng: random.Random, rows: list[dict], key: str) -> Any:
    return rng.choice(rows)[key]


def _tasks() -> list[Task]:
    E, F, R = "entity", "facts", "regions"
    t: list[Task] = []

    def task(complexity: str, tables: tuple[str, ...], task_type: str = "analytics and reporting"):
        def wrap(fn):
            t.append(Task(complexity, task_type, tables, fn))
            return fn
        return wrap

    # basic SQL
    @task("basic SQL", (E,))
    def by_category(d, w, rng):
        v = _pick(rng, w.entities, d.cat)
        return ([f"List the names of all {v} {d.many}.", f"Which {d.many} have the {d.cat_noun} '{v}'?",
                 f"Show the name of every {d.one} whose {d.cat_noun} is {v}."],
                f"SELECT name FROM {d.table} WHERE {d.cat} = '{v}';",
                f"Filters {d.table} on {d.cat} = '{v}' and returns the names.")

    @task("basic SQL", (E,))
    def above_threshold(d, w, rng):
        vals = sorted(e[d.n1] for e in w.entities)
        v = vals[len(vals) // 2 - 1]
        return ([f"Show the name and {d.n1_noun} of {d.many} with more than {v} {d.n1_noun.replace('number of ', '')}."
                 if d.n1_noun.startswith("number of") else f"Show the name and {d.n1_noun} of {d.many} with a {d.n1_noun} above {v}.",
                 f"Which {d.many} have {d.n1} greater than {v}? Give their names and {d.n1}."],
                f"SELECT name, {d.n1} FROM {d.table} WHERE {d.n1} > {v};",
                f"Selects {d.many} whose {d.n1} exceeds {v}.")

    @task("basic SQL", (E,))
    def in_region(d, w, rng):
        v = _pick(rng, w.entities, "region")
        return ([f"Find the {d.many} located in the {v} region.", f"List {d.many} in the {v} region.",
                 f"What are the names of {d.many} in region {v}?"],
                f"SELECT name FROM {d.table} WHERE region = '{v}';",
                f"Returns the names of {d.many} whose region is {v}.")

    @task("basic SQL", (E,))
    def top_n(d, w, rng):
        n = rng.choice([2, 3])
        return ([f"Show the top {n} {d.many} by {d.n2_noun}.", f"Which {n} {d.many} have the highest {d.n2_noun}?",
                 f"List the {n} {d.many} with the best {d.n2_noun}, highest first."],
                f"SELECT name, {d.n2} FROM {d.table} ORDER BY {d.n2} DESC LIMIT {n};",
                f"Orders {d.many} by {d.n2} descending and keeps the first {n}.")

    @task("basic SQL", (F,))
    def fact_range(d, w, rng):
        amounts = sorted(f[d.amount] for f in w.facts)
        lo, hi = amounts[1], amounts[-2]
        return ([f"List all {d.fact_many} with a {d.amount_noun} between {lo} and {hi}.",
                 f"Which {d.fact_many} have {d.amount} from {lo} to {hi}? Show their ids and {d.amount}."],
                f"SELECT {d.fact_id}, {d.amount} FROM {d.facts} WHERE {d.amount} BETWEEN {lo} AND {hi};",
                f"Filters {d.facts} to {d.amount} in [{lo}, {hi}].")

    @task("basic SQL", (F,))
    def recent_facts(d, w, rng):
        date = sorted(f[d.date] for f in w.facts)[len(w.facts) // 2]
        return ([f"Show all {d.fact_many} recorded after {date}.", f"List {d.fact_many} with a {d.date} later than {date}."],
                f"SELECT * FROM {d.facts} WHERE {d.date} > '{date}';",
                f"Selects {d.fact_many} dated after {date}.")

    # aggregation
    @task("aggregation", (E,))
    def count_per_category(d, w, rng):
        return ([f"How many {d.many} are there in each {d.cat_noun}?", f"Count the {d.many} per {d.cat_noun}.",
                 f"What is the number of {d.many} for every {d.cat_noun}?"],
                f"SELECT {d.cat}, COUNT(*) FROM {d.table} GROUP BY {d.cat};",
                f"Groups {d.table} by {d.cat} and counts rows.")

    @task("aggregation", (E,))
    def avg_of_category(d, w, rng):
        v = _pick(rng, w.entities, d.cat)
        return ([f"What is the average {d.n1_noun} of {v} {d.many}?", f"Find the mean {d.n1} for {d.many} with {d.cat_noun} {v}."],
                f"SELECT AVG({d.n1}) FROM {d.table} WHERE {d.cat} = '{v}';",
                f"Averages {d.n1} over {d.many} with {d.cat} = '{v}'.")

    @task("aggregation", (F,))
    def total_by_status(d, w, rng):
        v = _pick(rng, w.facts, d.status)
        return ([f"What is the total {d.amount_noun} of {d.fact_many} with {d.status_noun} {v}?",
                 f"Sum the {d.amount} of all {v} {d.fact_many}."],
                f"SELECT SUM({d.amount}) FROM {d.facts} WHERE {d.status} = '{v}';",
                f"Adds up {d.amount} for {d.fact_many} whose {d.status} is '{v}'.")

    @task("aggregation", (E,))
    def min_max(d, w, rng):
        return ([f"What are the lowest and highest {d.n2_noun} among {d.many}?", f"Show the minimum and maximum {d.n2} of {d.many}."],
                f"SELECT MIN({d.n2}), MAX({d.n2}) FROM {d.table};",
                f"Computes the minimum and maximum {d.n2}.")

    @task("aggregation", (F,))
    def having_count(d, w, rng):
        return ([f"Which {d.status_noun} values appear in more than one {d.fact}?",
                 f"List each {d.status_noun} that has at least two {d.fact_many}, with its count."],
                f"SELECT {d.status}, COUNT(*) FROM {d.facts} GROUP BY {d.status} HAVING COUNT(*) > 1;",
                f"Groups {d.facts} by {d.status} and keeps groups with more than one row.")

    @task("aggregation", (F,))
    def per_year(d, w, rng):
        year = _pick(rng, w.facts, d.date)[:4]
        return ([f"How many {d.fact_many} were recorded in {year}?", f"Count the {d.fact_many} from the year {year}."],
                f"SELECT COUNT(*) FROM {d.facts} WHERE {d.date} BETWEEN '{year}-01-01' AND '{year}-12-31';",
                f"Counts {d.fact_many} dated within {year}.")

    # single join
    @task("single join", (E, F))
    def total_per_entity(d, w, rng):
        return ([f"What is the total {d.amount_noun} for each {d.one}?", f"Show each {d.one}'s name with the sum of its {d.amount}.",
                 f"For every {d.one}, how much {d.amount_noun} was recorded in {d.facts}?"],
                f"SELECT e.name, SUM(f.{d.amount}) FROM {d.table} e JOIN {d.facts} f ON e.{d.id} = f.{d.id} GROUP BY e.name;",
                f"Joins {d.table} with {d.facts} on {d.id} and sums {d.amount} per {d.one}.")

    @task("single join", (E, F))
    def facts_in_region(d, w, rng):
        with_facts = {f[d.id] for f in w.facts}
        v = rng.choice([e["region"] for e in w.entities if e[d.id] in with_facts])
        return ([f"List the {d.fact_many} of {d.many} in the {v} region.", f"Which {d.fact_many} belong to {d.many} located in {v}?"],
                f"SELECT f.{d.fact_id} FROM {d.facts} f JOIN {d.table} e ON f.{d.id} = e.{d.id} WHERE e.region = '{v}';",
                f"Joins {d.facts} to {d.table} and keeps rows whose region is {v}.")

    @task("single join", (E, F))
    def entities_with_status(d, w, rng):
        v = _pick(rng, w.facts, d.status)
        return ([f"Which {d.many} have at least one {d.fact} with {d.status_noun} {v}?",
                 f"Show the distinct names of {d.many} that had a {v} {d.fact}."],
                f"SELECT DISTINCT e.name FROM {d.table} e JOIN {d.facts} f ON e.{d.id} = f.{d.id} WHERE f.{d.status} = '{v}';",
                f"Joins and filters on {d.status} = '{v}', returning distinct names.")

    @task("single join", (E, F))
    def avg_qty_per_category(d, w, rng):
        return ([f"What is the average {d.qty_noun} per {d.one} {d.cat_noun}?", f"Show the mean {d.qty} of {d.fact_many} for each {d.cat_noun}."],
                f"SELECT e.{d.cat}, AVG(f.{d.qty}) FROM {d.table} e JOIN {d.facts} f ON e.{d.id} = f.{d.id} GROUP BY e.{d.cat};",
                f"Joins the tables and averages {d.qty} per {d.cat}.")

    # multiple joins
    @task("multiple_joins", (E, F, R))
    def total_per_country(d, w, rng):
        return ([f"What is the total {d.amount_noun} per country?", f"Sum the {d.amount} of {d.fact_many} for each country."],
                f"SELECT r.country, SUM(f.{d.amount}) FROM {d.facts} f JOIN {d.table} e ON f.{d.id} = e.{d.id} "
                f"JOIN regions r ON e.region = r.region GROUP BY r.country;",
                f"Joins {d.facts}, {d.table} and regions, then sums {d.amount} per country.")

    @task("multiple_joins", (E, F, R))
    def names_in_country(d, w, rng):
        region_country = dict(w.regions)
        with_facts = {f[d.id] for f in w.facts}
        v = region_country[rng.choice([e["region"] for e in w.entities if e[d.id] in with_facts])]
        return ([f"List the names of {d.many} in {v} that have {d.fact_many}, with each {d.fact}'s {d.amount}.",
                 f"Show {d.one} names and {d.amount} for {d.fact_many} of {d.many} located in {v}."],
                f"SELECT e.name, f.{d.amount} FROM {d.table} e JOIN {d.facts} f ON e.{d.id} = f.{d.id} "
                f"JOIN regions r ON e.region = r.region WHERE r.country = '{v}';",
                f"Three-way join filtered on country = '{v}'.")

    # subqueries
    @task("subqueries", (E,))
    def above_average(d, w, rng):
        return ([f"Which {d.many} have a {d.n1_noun} above the average?", f"List {d.many} whose {d.n1} is greater than the average {d.n1}."],
                f"SELECT name FROM {d.table} WHERE {d.n1} > (SELECT AVG({d.n1}) FROM {d.table});",
                f"Compares each {d.one}'s {d.n1} to the average computed in a subquery.")

    @task("subqueries", (E, F))
    def without_facts(d, w, rng):
        return ([f"List the {d.many} that have no {d.fact_many}.", f"Which {d.many} do not appear in {d.facts}?"],
                f"SELECT name FROM {d.table} WHERE {d.id} NOT IN (SELECT {d.id} FROM {d.facts});",
                f"Keeps {d.many} whose {d.id} is absent from {d.facts}.")

    @task("subqueries", (E, F))
    def with_big_fact(d, w, rng):
        amounts = sorted(f[d.amount] for f in w.facts)
        v = amounts[len(amounts) // 2]
        return ([f"Which {d.many} have a {d.fact} with {d.amount_noun} over {v}?",
                 f"Find the names of {d.many} that recorded any {d.fact} above {v} in {d.amount}."],
                f"SELECT name FROM {d.table} WHERE {d.id} IN (SELECT {d.id} FROM {d.facts} WHERE {d.amount} > {v});",
                f"Uses an IN subquery on {d.facts} filtered by {d.amount} > {v}.")

    # window functions
    @task("window functions", (E,))
    def rank_in_category(d, w, rng):
        return ([f"Rank the {d.many} by {d.n1_noun} within each {d.cat_noun}.",
                 f"For each {d.cat_noun}, rank {d.many} from highest to lowest {d.n1}."],
                f"SELECT name, {d.cat}, RANK() OVER (PARTITION BY {d.cat} ORDER BY {d.n1} DESC) AS rnk FROM {d.table};",
                f"RANK() over partitions of {d.cat} ordered by {d.n1}.")

    @task("window functions", (F,))
    def running_total(d, w, rng):
        return ([f"Show each {d.fact}'s {d.amount_noun} and the running total ordered by {d.date}.",
                 f"Compute a cumulative sum of {d.amount} over time for {d.fact_many}."],
                f"SELECT {d.fact_id}, {d.amount}, SUM({d.amount}) OVER (ORDER BY {d.date}, {d.fact_id}) AS running_total FROM {d.facts};",
                f"A window SUM ordered by {d.date} gives the running total.")

    @task("window functions", (E,))
    def category_average(d, w, rng):
        return ([f"For each {d.one}, show its {d.n2_noun} and the average {d.n2_noun} of its {d.cat_noun}.",
                 f"List {d.many} with their {d.n2} next to the mean {d.n2} of the same {d.cat}."],
                f"SELECT name, {d.n2}, AVG({d.n2}) OVER (PARTITION BY {d.cat}) AS cat_avg FROM {d.table};",
                f"AVG over a partition by {d.cat}.")

    # CTEs
    @task("CTEs", (E, F))
    def cte_totals(d, w, rng):
        totals: dict[int, int] = {}
        for f in w.facts:
            totals[f[d.id]] = totals.get(f[d.id], 0) + f[d.amount]
        v = sorted(totals.values())[len(totals) // 2] - 1
        return ([f"Using a CTE, find the {d.many} whose total {d.amount_noun} exceeds {v}.",
                 f"Which {d.many} have a combined {d.amount} above {v}? Use a common table expression."],
                f"WITH totals AS (SELECT {d.id}, SUM({d.amount}) AS total FROM {d.facts} GROUP BY {d.id}) "
                f"SELECT e.name, t.total FROM {d.table} e JOIN totals t ON e.{d.id} = t.{d.id} WHERE t.total > {v};",
                f"A CTE sums {d.amount} per {d.one}; the outer query keeps totals above {v}.")

    @task("CTEs", (F,))
    def cte_average_count(d, w, rng):
        return ([f"What is the average number of {d.fact_many} per {d.one}?",
                 f"Using a CTE, compute how many {d.fact_many} each {d.one} has on average."],
                f"WITH counts AS (SELECT {d.id}, COUNT(*) AS n FROM {d.facts} GROUP BY {d.id}) SELECT AVG(n) FROM counts;",
                f"Counts {d.fact_many} per {d.one} in a CTE, then averages the counts.")

    # set operations
    @task("set operations", (E,))
    def union_regions(d, w, rng):
        a, b = rng.sample(sorted({e[d.cat] for e in w.entities} | set(d.cats)), 2)
        return ([f"List the regions that have {a} or {b} {d.many}.", f"Which regions host a {a} {d.one} or a {b} {d.one}?"],
                f"SELECT region FROM {d.table} WHERE {d.cat} = '{a}' UNION SELECT region FROM {d.table} WHERE {d.cat} = '{b}';",
                f"UNION of the regions of {a} and {b} {d.many}.")

    @task("set operations", (F,))
    def except_status(d, w, rng):
        a, b = rng.sample(d.statuses, 2)
        return ([f"Which {d.one} ids have {d.fact_many} with {d.status_noun} {a} but none with {b}?",
                 f"Find {d.id} values that appear with {d.status} {a} and never with {b}."],
                f"SELECT {d.id} FROM {d.facts} WHERE {d.status} = '{a}' EXCEPT SELECT {d.id} FROM {d.facts} WHERE {d.status} = '{b}';",
                f"EXCEPT removes ids seen with {d.status} '{b}'.")

    @task("set operations", (F,))
    def intersect_status(d, w, rng):
        a, b = rng.sample(d.statuses, 2)
        return ([f"Which {d.one} ids have {d.fact_many} with both {d.status_noun} {a} and {b}?"],
                f"SELECT {d.id} FROM {d.facts} WHERE {d.status} = '{a}' INTERSECT SELECT {d.id} FROM {d.facts} WHERE {d.status} = '{b}';",
                "INTERSECT keeps ids seen with both values.")

    # data manipulation
    @task("basic SQL", (E,), "data manipulation")
    def insert_entity(d, w, rng):
        name = rng.choice(["Nova", "Summit", "Harbor Light", "Crescent", "Evergreen", "Atlas"])
        new_id = len(w.entities) + 1
        cat, region = rng.choice(d.cats), rng.choice(w.regions)[0]
        n1, n2 = rng.randint(*d.n1_range), round(rng.uniform(*d.n2_range), 1)
        return ([f"Add a new {cat} {d.one} named '{name}' in the {region} region with id {new_id}, {d.n1} {n1} and {d.n2} {n2}.",
                 f"Insert a {d.one} record: id {new_id}, name {name}, {d.cat} {cat}, region {region}, {d.n1} {n1}, {d.n2} {n2}."],
                f"INSERT INTO {d.table} ({d.id}, name, {d.cat}, region, {d.n1}, {d.n2}) VALUES ({new_id}, '{name}', '{cat}', '{region}', {n1}, {n2});",
                f"Inserts one row into {d.table}.")

    @task("basic SQL", (E,), "data manipulation")
    def update_entity(d, w, rng):
        e = rng.choice(w.entities)
        inc = rng.randint(1, 20)
        return ([f"Increase the {d.n1_noun} of the {d.one} named '{e['name']}' by {inc}.",
                 f"Update {d.table}: add {inc} to {d.n1} for {e['name']}."],
                f"UPDATE {d.table} SET {d.n1} = {d.n1} + {inc} WHERE name = '{e['name']}';",
                f"Adds {inc} to {d.n1} for one {d.one}.")

    @task("basic SQL", (F,), "data manipulation")
    def delete_facts(d, w, rng):
        amounts = sorted(f[d.amount] for f in w.facts)
        v = amounts[len(amounts) // 3]
        return ([f"Delete all {d.fact_many} with a {d.amount_noun} below {v}.", f"Remove {d.fact_many} whose {d.amount} is less than {v}."],
                f"DELETE FROM {d.facts} WHERE {d.amount} < {v};",
                f"Deletes rows of {d.facts} with {d.amount} < {v}.")

    return t


TASKS = _tasks()


def gold_ok(context: str, sql: str, dml: bool) -> bool:
    """The gold runs against its context and returns rows (SELECT) or changes rows (DML)."""
    con = sqlite3.connect(":memory:")
    try:
        con.executescript(context)
        before = con.total_changes
        rows = con.execute(sql).fetchall()
        return (con.total_changes > before) if dml else bool(rows)
    except sqlite3.Error:
        return False
    finally:
        con.close()


def generate(n_rows: int, seed: int = 0) -> list[dict[str, Any]]:
    """n_rows gretel-shaped rows, reproducible from seed; tasks and domains are interleaved evenly."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    attempts = 0
    while len(rows) < n_rows:
        attempts += 1
        if attempts > n_rows * 20:
            raise RuntimeError("generator cannot find enough distinct runnable rows")
        task = TASKS[len(rows) % len(TASKS)] if attempts % 7 else rng.choice(TASKS)
        domain = rng.choice(DOMAINS)
        world = World(domain, rng)
        phrasings, sql, explanation = task.build(domain, world, rng)
        context = world.context(task.tables)
        prompt = rng.choice(phrasings)
        if (prompt, context) in seen or not gold_ok(context, sql, task.task_type == "data manipulation"):
            continue
        seen.add((prompt, context))
        rows.append({
            "id": len(rows) + 1,
            "domain": domain.name,
            "domain_description": domain.description,
            "sql_complexity": task.complexity,
            "sql_complexity_description": COMPLEXITY_DESCRIPTIONS[task.complexity],
            "sql_task_type": task.task_type,
            "sql_task_type_description": TASK_DESCRIPTIONS[task.task_type],
            "sql_prompt": prompt,
            "sql_context": context,
            "sql": sql,
            "sql_explanation": explanation,
        })
    return rows


def builtin_rows() -> list[dict[str, Any]]:
    with gzip.open(DATA_FILE, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def write(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(filename="", mode="wb", fileobj=open(path, "wb"), mtime=0) as gz:
        gz.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lorad.sqldata", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DATA_FILE)
    args = parser.parse_args(argv)
    rows = generate(args.rows, args.seed)
    write(rows, args.out)
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
